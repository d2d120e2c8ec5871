local page = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. ARGV[1], '+inf',
    'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
if #page == 0 then return out end
local ids = {}
for i = 1, #page, 2 do ids[#ids + 1] = page[i] end
local values = redis.call('HMGET', KEYS[1], unpack(ids))
for i, id in ipairs(ids) do
    local value = values[i]
    if not value then
        redis.call('ZREM', KEYS[2], id)
        redis.call('HDEL', KEYS[3], id)
    end
    out[i] = {id, tonumber(page[2 * i]), value}
end
return out
