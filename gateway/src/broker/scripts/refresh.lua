-- Push the expiry of a node's live presence entries forward; re-create entries that vanished
-- (Redis flushed or restarted empty, or another node pruned them while this node was stalled)
-- and announce the login of each user who was absent, so members' lists come right again.
-- Builds room key names from the prefix and the encoded room key (see keys.rs); standalone
-- Redis only.
-- KEYS[1] expiry zset, KEYS[2] rooms hash
-- ARGV[1] expires at (ms), ARGV[2] key prefix, ARGV[3] envelope header, ARGV[4] largest room
-- size whose logins are announced, ARGV[5] announcements per second, ARGV[6] the login
-- announcement's template, then per entry five values:
-- encoded room key, conn key, userId, presence record, room record
-- Returns the number of entries re-created.
-- Fill an announcement template from Rust (protocol::Announcement): bytes 1-4 stand for the
-- user fragment, room id JSON, room name JSON and count. The scripts never write client JSON.
local function render(template, user, room_id, room_name, num)
  local values = {['\1'] = user, ['\2'] = room_id, ['\3'] = room_name, ['\4'] = tostring(num)}
  return (string.gsub(template, '[\1-\4]', values))
end
-- At most ARGV cap announcements per room and second, whoever toggles (a client joining and
-- leaving in a loop, or many clients at once, cannot flood the room with presence frames).
local function may_announce(key, cap)
  local n = redis.call('INCR', key)
  if n == 1 then redis.call('PEXPIRE', key, 1000) end
  return n <= cap
end
local restored = 0
for i = 7, #ARGV, 5 do
  local room, conn, user, record = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local base = ARGV[2] .. '{r:' .. room .. '}:'
  if redis.call('HSETNX', base .. 'pc', conn, record) == 1 then
    local first = redis.call('HINCRBY', base .. 'pu', user, 1) == 1
    redis.call('HSETNX', KEYS[2], room, ARGV[i + 4])
    restored = restored + 1
    local num = redis.call('HLEN', base .. 'pu')
    if first and num <= tonumber(ARGV[4]) and may_announce(base .. 'an', tonumber(ARGV[5])) then
      -- `<len(userId)>:<userId><user fragment>` and `<roomId JSON>\n<roomName JSON>`
      local colon = string.find(record, ':', 1, true)
      local fragment = string.sub(record, colon + tonumber(string.sub(record, 1, colon - 1)) + 1)
      local room_record = redis.call('HGET', KEYS[2], room)
      local nl = string.find(room_record, '\n', 1, true)
      redis.call('PUBLISH', base .. 'ch', ARGV[3] .. render(ARGV[6], fragment,
        string.sub(room_record, 1, nl - 1), string.sub(room_record, nl + 1), num))
    end
  end
  redis.call('ZADD', KEYS[1], ARGV[1], room .. '\n' .. conn)
end
return restored
