-- A page of a conversation's log. KEYS: meta, log, ids, members (private: the meta again).
-- ARGV: 'a' (after seq, forwards) or 'b' (before seq, backwards; 0: the newest), seq, limit,
-- viewer ('0': no membership check), messages before the join a member may read, cutoff
-- ms, 'p' or 'g'. Answers the entries, oldest first; -1 when the viewer is not a member.
local group = ARGV[7] == 'g'
local seq, limit = tonumber(ARGV[2]), tonumber(ARGV[3])
local floor = 1
if group then
    if group_gone() then
        if ARGV[4] == '0' then return {} end
        return -1
    end
    if ARGV[4] ~= '0' then
        local m = redis.call('HGET', KEYS[4], ARGV[4])
        if not m then return -1 end
        local joined = tonumber(string.match(m, ':(%d+)$'))
        floor = math.max(1, joined - tonumber(ARGV[5]))
    end
end
trim_age(tonumber(ARGV[6]))
local first = first_seq()
if not first or limit <= 0 then return {} end
local last = first + redis.call('LLEN', KEYS[2]) - 1
floor = math.max(floor, first)
local lo, hi
if ARGV[1] == 'a' then
    lo = math.max(seq + 1, floor)
    hi = math.min(lo + limit - 1, last)
else
    hi = last
    if seq > 0 then hi = math.min(seq - 1, last) end
    lo = math.max(hi - limit + 1, floor)
end
if lo > hi then return {} end
return redis.call('LRANGE', KEYS[2], lo - first, hi - first)
