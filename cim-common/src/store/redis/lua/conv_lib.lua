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
-- Keeps `keys` alive for at least `ttl` ms more, writing their TTLs only when the log's is
-- below `ttl`: they are set to `ttl` plus a slack (a tenth, at most an hour), so a busy
-- conversation refreshes them once per slack, not with every message (3 writes per append).
local function keep_alive(keys, ttl)
    if redis.call('PTTL', KEYS[2]) >= ttl then return end
    local until_ms = ttl + math.min(math.floor(ttl / 10), 3600000)
    for _, k in ipairs(keys) do redis.call('PEXPIRE', k, until_ms) end
end
-- Calls `cmd` on `key` with `args` in chunks (Lua's unpack has a stack limit), concatenating
-- the replies that are arrays; returns the last integer reply otherwise.
local function chunked(cmd, key, args)
    local out, last = {}, nil
    for from = 1, #args, 2000 do
        local r = redis.call(cmd, key, unpack(args, from, math.min(from + 1999, #args)))
        if type(r) == 'table' then
            for _, v in ipairs(r) do out[#out + 1] = v end
        else
            last = r
        end
    end
    return out, last
end
-- Appends `items` ({id, unix ms, encoded message} each, in order), skipping those whose id is
-- among the newest `window` or earlier in `items`. One command of each kind for all of them
-- (per-message commands were most of a private message's Redis time). Returns per item {seq, stored entry of a repeat (false
-- when it was trimmed away or new), repeated}, and the HSET arguments of the meta's `last`
-- and `at` (nil when nothing was new), for the caller's one write of the meta.
local function append_all(items, max_count, window)
    local n = #items
    local out = {}
    if n == 0 then return out end
    local ids = {}
    for i = 1, n do ids[i] = items[i][1] end
    local known = chunked('ZMSCORE', KEYS[3], ids)
    local fresh, first_of = {}, {}
    for i = 1, n do
        if not known[i] and not first_of[ids[i]] then
            first_of[ids[i]] = i
            fresh[#fresh + 1] = i
        end
    end
    local entries = {}
    if #fresh > 0 then
        local top = redis.call('HINCRBY', KEYS[1], 'top', #fresh) - #fresh
        local scored = {}
        for k, i in ipairs(fresh) do
            local seq = top + k
            entries[i] = seq .. '|' .. items[i][2] .. '|' .. items[i][3]
            scored[2 * k - 1] = seq
            scored[2 * k] = ids[i]
            out[i] = {seq, false, false}
        end
        local list = {}
        for k, i in ipairs(fresh) do list[k] = entries[i] end
        local _, len = chunked('RPUSH', KEYS[2], list)
        chunked('ZADD', KEYS[3], scored)
        if len > max_count then redis.call('LTRIM', KEYS[2], -max_count, -1) end
        if redis.call('ZCARD', KEYS[3]) > window then
            redis.call('ZREMRANGEBYRANK', KEYS[3], 0, -window - 1)
        end
    end
    local meta = nil
    if #fresh > 0 then
        local last = fresh[#fresh]
        meta = {'last', entries[last], 'at', items[last][2]}
    end
    local first = false
    for i = 1, n do
        if known[i] then
            -- Stored before: its entry from the log, if the log still has it.
            local seq = tonumber(known[i])
            if first == false then first = first_seq() end
            local copy = false
            if first and seq >= first then
                copy = redis.call('LINDEX', KEYS[2], seq - first) or false
            end
            out[i] = {seq, copy, true}
        elseif not out[i] then
            -- The same id earlier in this call: that one's entry.
            local j = first_of[ids[i]]
            out[i] = {out[j][1], entries[j], true}
        end
    end
    return out, meta
end
-- One message: see `append_all` (the meta written here).
local function append(id, ts, bytes, max_count, window)
    local all, meta = append_all({{id, ts, bytes}}, max_count, window)
    if meta then redis.call('HSET', KEYS[1], unpack(meta)) end
    local r = all[1]
    return r[1], r[2], r[3]
end
local function group_gone()
    return redis.call('EXISTS', KEYS[1]) == 0 or redis.call('HGET', KEYS[1], 'gone') == '1'
end
