for i = 1, #ARGV, 2 do
    local seq = redis.call('ZSCORE', KEYS[2], ARGV[i])
    if seq and tonumber(seq) == tonumber(ARGV[i + 1]) then
        redis.call('ZREM', KEYS[2], ARGV[i])
        redis.call('HDEL', KEYS[1], ARGV[i])
        redis.call('HDEL', KEYS[3], ARGV[i])
    end
end
return 0
