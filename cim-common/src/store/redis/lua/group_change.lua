-- A change of a group and its event, atomically. KEYS: meta, log, ids, members, read marks.
-- ARGV: op, max messages, cutoff ms, ttl ms, id window, event id, event unix ms, encoded
-- event, then the op's arguments:
--   create: owner, name          add: max members, user ids…     remove: user ids…
--   role: user id, role code     rename: name                    disband: (none)
-- Answers {status, seq, version, user ids…}: status 'ok' (seq 0: nothing changed, no event),
-- 'nogroup', 'full', 'notmember', 'exists'; the ids are those added, removed or (disband)
-- the members there were.
local op = ARGV[1]
local max_count, cutoff, ttl, window =
    tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local function event()
    trim_age(cutoff)
    local seq = append(ARGV[6], ARGV[7], ARGV[8], max_count, window)
    redis.call('PEXPIRE', KEYS[2], ttl)
    redis.call('PEXPIRE', KEYS[3], ttl)
    return seq
end
local function version() return tonumber(redis.call('HGET', KEYS[1], 'ver') or '0') end
if op == 'create' then
    if redis.call('EXISTS', KEYS[1]) == 1 then return {'exists', 0, 0} end
    redis.call('HSET', KEYS[1], 'name', ARGV[10], 'owner', ARGV[9], 'created', ARGV[7], 'ver', 1)
    local seq = event()
    redis.call('HSET', KEYS[4], ARGV[9], 'o:' .. seq)
    redis.call('HSET', KEYS[5], ARGV[9], seq)
    return {'ok', seq, 1}
end
if group_gone() then return {'nogroup', 0, 0} end
if op == 'add' then
    local fresh = {}
    for i = 10, #ARGV do
        if redis.call('HEXISTS', KEYS[4], ARGV[i]) == 0 then fresh[#fresh + 1] = ARGV[i] end
    end
    if #fresh == 0 then return {'ok', 0, version()} end
    if redis.call('HLEN', KEYS[4]) + #fresh > tonumber(ARGV[9]) then return {'full', 0, version()} end
    local seq = event()
    for _, u in ipairs(fresh) do
        redis.call('HSET', KEYS[4], u, 'm:' .. seq)
        redis.call('HSET', KEYS[5], u, seq)
    end
    local out = {'ok', seq, redis.call('HINCRBY', KEYS[1], 'ver', 1)}
    for _, u in ipairs(fresh) do out[#out + 1] = u end
    return out
elseif op == 'remove' then
    local gone = {}
    for i = 9, #ARGV do
        local m = redis.call('HGET', KEYS[4], ARGV[i])
        if m and string.sub(m, 1, 1) ~= 'o' then gone[#gone + 1] = ARGV[i] end
    end
    if #gone == 0 then return {'ok', 0, version()} end
    local seq = event()
    for _, u in ipairs(gone) do
        redis.call('HDEL', KEYS[4], u)
        redis.call('HDEL', KEYS[5], u)
    end
    local out = {'ok', seq, redis.call('HINCRBY', KEYS[1], 'ver', 1)}
    for _, u in ipairs(gone) do out[#out + 1] = u end
    return out
elseif op == 'role' then
    local m = redis.call('HGET', KEYS[4], ARGV[9])
    if not m or string.sub(m, 1, 1) == 'o' then return {'notmember', 0, version()} end
    local seq = event()
    redis.call('HSET', KEYS[4], ARGV[9], ARGV[10] .. string.sub(m, 2))
    return {'ok', seq, version()}
elseif op == 'rename' then
    redis.call('HSET', KEYS[1], 'name', ARGV[9])
    return {'ok', event(), version()}
elseif op == 'disband' then
    local seq = event()
    local members = redis.call('HKEYS', KEYS[4])
    redis.call('DEL', KEYS[4], KEYS[5])
    redis.call('HSET', KEYS[1], 'gone', '1')
    local out = {'ok', seq, redis.call('HINCRBY', KEYS[1], 'ver', 1)}
    for _, u in ipairs(members) do out[#out + 1] = u end
    redis.call('PEXPIRE', KEYS[1], ttl)
    return out
end
return redis.error_reply('unknown group change ' .. op)
