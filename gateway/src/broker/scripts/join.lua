-- Record one connection's presence in a room; announce the user's login if it is the user's
-- first connection there. The room keeps the name its first joiner gave while anyone is in it.
-- KEYS[1] room conns hash, KEYS[2] room users hash, KEYS[3] expiry zset, KEYS[4] rooms hash,
-- KEYS[5] the room's announcement counter
-- ARGV[1] conn key, ARGV[2] userId, ARGV[3] user fragment, ARGV[4] expires at (ms),
-- ARGV[5] encoded room key, ARGV[6] room record (`<roomId JSON>\n<roomName JSON>`),
-- ARGV[7] channel, ARGV[8] envelope header, ARGV[9] largest room size whose logins are
-- announced, ARGV[10] roomId JSON as this joiner wrote it, ARGV[11] announcements per second,
-- ARGV[12] the login announcement's template
-- Records are length-prefixed (`<len(userId)>:<userId><fragment>`): no byte of a client
-- string can be taken for a separator.
-- Returns {first (1|0), num, announced (1|0), roomName JSON}.
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
local record = string.len(ARGV[2]) .. ':' .. ARGV[2] .. ARGV[3]
local added = redis.call('HSET', KEYS[1], ARGV[1], record)
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[5] .. '\n' .. ARGV[1])
local first = 0
if added == 1 and redis.call('HINCRBY', KEYS[2], ARGV[2], 1) == 1 then
  first = 1
end
redis.call('HSETNX', KEYS[4], ARGV[5], ARGV[6])
local room = redis.call('HGET', KEYS[4], ARGV[5])
local name = string.sub(room, string.find(room, '\n', 1, true) + 1)
local num = redis.call('HLEN', KEYS[2])
local announced = 0
if first == 1 and num <= tonumber(ARGV[9]) and may_announce(KEYS[5], tonumber(ARGV[11])) then
  announced = 1
  redis.call('PUBLISH', ARGV[7], ARGV[8] .. render(ARGV[12], ARGV[3], ARGV[10], name, num))
end
return {first, num, announced, name}
