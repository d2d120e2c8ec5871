-- Moves a read mark forward, up to the conversation's top. KEYS: meta, the marks' hash (a
-- private conversation: the meta), members (private: the meta). ARGV: field, seq, 'p' or
-- 'g', user id. Answers the mark now; -1 when the user is not a member of the group.
if ARGV[3] == 'g' and redis.call('HEXISTS', KEYS[3], ARGV[4]) == 0 then return -1 end
local top = tonumber(redis.call('HGET', KEYS[1], 'top') or '0')
local want = math.min(tonumber(ARGV[2]), top)
local cur = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
if want > cur then
    redis.call('HSET', KEYS[2], ARGV[1], want)
    return want
end
return cur
