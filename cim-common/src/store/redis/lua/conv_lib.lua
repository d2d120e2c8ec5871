-- Shared by the conversation scripts (prepended to each by scripts.rs). KEYS[1] is the
-- conversation's meta hash, KEYS[2] its log (list of `{seq}|{unix ms}|{message}`, oldest
-- first, seqs consecutive), KEYS[3] the ids of its newest messages scored by seq.
local function entry_seq(e) return tonumber(string.match(e, '^(%d+)|')) end
local function entry_ts(e) return tonumber(string.match(e, '^%d+|(%-?%d+)|')) end
-- Drops messages older than `cutoff` (unix ms) from the front, a bounded number per call.
local function trim_age(cutoff)
    for _ = 1, 64 do
        local e = redis.call('LINDEX', KEYS[2], 0)
        if not e or entry_ts(e) >= cutoff then return end
        redis.call('LPOP', KEYS[2])
    end
end
local function first_seq()
    local e = redis.call('LINDEX', KEYS[2], 0)
    if not e then return nil end
    return entry_seq(e)
end
local function set_max(key, field, value)
    local cur = tonumber(redis.call('HGET', key, field) or '0')
    if value > cur then redis.call('HSET', key, field, value) end
end
-- Appends one message unless its id is among the newest `window`: returns its seq, and for
-- a repeat the stored entry (false when it was trimmed away or is new).
local function append(id, ts, bytes, max_count, window)
    local known = redis.call('ZSCORE', KEYS[3], id)
    if known then
        local seq = tonumber(known)
        local first = first_seq()
        local copy = false
        if first and seq >= first then
            copy = redis.call('LINDEX', KEYS[2], seq - first) or false
        end
        return seq, copy, true
    end
    local seq = redis.call('HINCRBY', KEYS[1], 'top', 1)
    local e = seq .. '|' .. ts .. '|' .. bytes
    redis.call('RPUSH', KEYS[2], e)
    redis.call('ZADD', KEYS[3], seq, id)
    redis.call('HSET', KEYS[1], 'last', e, 'at', ts)
    if redis.call('LLEN', KEYS[2]) > max_count then
        redis.call('LTRIM', KEYS[2], -max_count, -1)
    end
    if redis.call('ZCARD', KEYS[3]) > window then
        redis.call('ZREMRANGEBYRANK', KEYS[3], 0, -window - 1)
    end
    return seq, false, false
end
local function group_gone()
    return redis.call('EXISTS', KEYS[1]) == 0 or redis.call('HGET', KEYS[1], 'gone') == '1'
end
