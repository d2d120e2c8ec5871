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
-- Members checked once per sender; then everything appended at once.
local member = {}
local items, item_of = {}, {}
for i = 6, #ARGV, 4 do
    local sender = ARGV[i]
    if group and sender ~= '0' and member[sender] == nil then
        member[sender] = redis.call('HEXISTS', KEYS[4], sender) == 1
    end
    if not group or sender == '0' or member[sender] then
        items[#items + 1] = {ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]}
        item_of[i] = #items
    end
end
local appended, meta = append_all(items, max_count, window)
-- Each sender's read mark: its newest message here (sending reads what came before). A new
-- message's seq is the top, above any mark (marks are clamped to the top), so it is set
-- without reading the old one; a repeat's mark was set with its first attempt.
local marks = {}
for i = 6, #ARGV, 4 do
    local k = item_of[i]
    local sender = ARGV[i]
    if k and sender ~= '0' and not appended[k][3] then
        local seq = appended[k][1]
        if not marks[sender] or seq > marks[sender] then marks[sender] = seq end
    end
end
-- One write of the meta (last message, its time, a private pair's marks) and, in a group,
-- one of its read marks.
local group_marks = {}
for sender, seq in pairs(marks) do
    if group then
        group_marks[#group_marks + 1] = sender
        group_marks[#group_marks + 1] = seq
    elseif meta then
        meta[#meta + 1] = 'r' .. sender
        meta[#meta + 1] = seq
    end
end
if meta then redis.call('HSET', KEYS[1], unpack(meta)) end
if #group_marks > 0 then redis.call('HSET', KEYS[5], unpack(group_marks)) end
for i = 6, #ARGV, 4 do
    local k = item_of[i]
    if not k then
        answer('notmember', 0, ver, false)
    else
        local r = appended[k]
        answer(r[3] and 'repeat' or 'ok', r[1], ver, r[2])
    end
end
if group then keep_alive({KEYS[2], KEYS[3]}, ttl) else keep_alive({KEYS[1], KEYS[2], KEYS[3]}, ttl) end
return out
