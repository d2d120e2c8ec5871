-- Moves a user's group positions forward. KEYS: the user's groups hash. ARGV: pairs of group
-- id, seq. Only groups the hash lists (the user's), never back.
for i = 1, #ARGV, 2 do
    local cur = redis.call('HGET', KEYS[1], ARGV[i])
    if cur and tonumber(cur) < tonumber(ARGV[i + 1]) then
        redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
    end
end
return 1
