local ids = {}
for i = 3, #ARGV, 3 do ids[#ids + 1] = ARGV[i] end
local scores = redis.call('ZMSCORE', KEYS[2], unpack(ids))
local seqs, fresh, stored, dups, pending = {}, {}, {}, {}, {}
for k, id in ipairs(ids) do
    if scores[k] then
        stored[#stored + 1] = {k, tonumber(scores[k]), id}
    elseif pending[id] then
        dups[#dups + 1] = {k, pending[id], id}
    else
        pending[id] = k
        fresh[#fresh + 1] = k
    end
end
local receipts = false
if #fresh > 0 then
    local first = redis.call('INCRBY', KEYS[4], #fresh) - #fresh
    local values, order, senders = {}, {}, {}
    for j, k in ipairs(fresh) do
        local seq = first + j
        local i = 3 * k
        seqs[k] = seq
        values[#values + 1] = ARGV[i]
        values[#values + 1] = ARGV[i + 1]
        order[#order + 1] = seq
        order[#order + 1] = ARGV[i]
        if ARGV[i + 2] ~= '0' then
            senders[#senders + 1] = ARGV[i]
            senders[#senders + 1] = ARGV[i + 2]
        end
    end
    redis.call('HSET', KEYS[1], unpack(values))
    redis.call('ZADD', KEYS[2], unpack(order))
    if #senders > 0 then
        redis.call('HSET', KEYS[3], unpack(senders))
        receipts = true
    end
end
-- Already stored (a retry), or twice in this call: the stored seq and copy.
local copies = {}
for _, d in ipairs(stored) do
    seqs[d[1]] = d[2]
    copies[#copies + 1] = {d[1], redis.call('HGET', KEYS[1], d[3])}
end
for _, d in ipairs(dups) do
    seqs[d[1]] = seqs[d[2]]
    copies[#copies + 1] = {d[1], redis.call('HGET', KEYS[1], d[3])}
end
local excess = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[1])
if excess > 0 then
    local popped = redis.call('ZPOPMIN', KEYS[2], excess)
    for i = 1, #popped, 2 do
        redis.call('HDEL', KEYS[1], popped[i])
        redis.call('HDEL', KEYS[3], popped[i])
    end
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
if receipts or redis.call('EXISTS', KEYS[3]) == 1 then
    redis.call('PEXPIRE', KEYS[3], ARGV[2])
end
if #copies == 0 then return seqs[1] end
local flat = {}
for k = 1, #ids do flat[k] = seqs[k] end
for _, c in ipairs(copies) do
    flat[#flat + 1] = c[1]
    flat[#flat + 1] = c[2]
end
return flat
