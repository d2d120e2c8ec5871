-- KEYS: meta, log, ids, members, read marks (a private conversation: the meta again for the
-- last two). ARGV: 'p' or 'g', max messages, cutoff ms, ttl ms, id window, then per
-- message: sender, id, unix ms, encoded message. Answers 4 values per message: status
-- ('ok', 'repeat', 'notmember', 'nogroup'), seq, membership version, stored entry of a repeat.
local group = ARGV[1] == 'g'
local max_count, cutoff, ttl, window =
    tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local out = {}
local function answer(status, seq, ver, copy)
    out[#out + 1] = status
    out[#out + 1] = seq
    out[#out + 1] = ver
    out[#out + 1] = copy
end
if group and group_gone() then
    for _ = 6, #ARGV, 4 do answer('nogroup', 0, 0, false) end
    return out
end
trim_age(cutoff)
local ver = 0
if group then ver = tonumber(redis.call('HGET', KEYS[1], 'ver') or '0') end
for i = 6, #ARGV, 4 do
    local sender = ARGV[i]
    if group and sender ~= '0' and redis.call('HEXISTS', KEYS[4], sender) == 0 then
        answer('notmember', 0, ver, false)
    else
        local seq, copy, repeated = append(ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], max_count, window)
        if sender ~= '0' then
            if group then set_max(KEYS[5], sender, seq) else set_max(KEYS[1], 'r' .. sender, seq) end
        end
        answer(repeated and 'repeat' or 'ok', seq, ver, copy)
    end
end
redis.call('PEXPIRE', KEYS[2], ttl)
redis.call('PEXPIRE', KEYS[3], ttl)
if not group then redis.call('PEXPIRE', KEYS[1], ttl) end
return out
