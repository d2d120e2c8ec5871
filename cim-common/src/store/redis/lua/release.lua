local v = redis.call('GET', KEYS[1])
if not v then return nil end
if v == ARGV[1] or string.sub(v, 1, string.len(ARGV[1]) + 1) == ARGV[1] .. '@' then
    redis.call('DEL', KEYS[1])
    return v
end
return nil
