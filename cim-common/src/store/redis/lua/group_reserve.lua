-- A user's half of joining a group, atomic so that concurrent joins cannot pass the limit.
-- KEYS: the user's groups hash. ARGV: group id, max groups. Answers 1 when listed already,
-- 2 when listed now (position 0), 0 when the user is at the limit.
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 1 end
if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], 0)
return 2
