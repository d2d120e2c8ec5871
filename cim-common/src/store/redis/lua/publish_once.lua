-- A message event, once per (message, receiver) within a window. KEYS: the receiver's
-- event stream, the stream's remembered (message, receiver) pairs (sorted set scored by
-- unix ms). ARGV: stream max length (approximate), the pair, now ms, window ms, then the
-- entry's field / value pairs. Answers 1 when published, 0 for a repeat.
local now, window = tonumber(ARGV[3]), tonumber(ARGV[4])
if redis.call('ZSCORE', KEYS[2], ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[2], now, ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
redis.call('PEXPIRE', KEYS[2], window)
local args = {'XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*'}
for i = 5, #ARGV do args[#args + 1] = ARGV[i] end
redis.call(unpack(args))
return 1
