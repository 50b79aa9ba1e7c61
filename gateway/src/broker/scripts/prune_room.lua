-- Remove a room's presence entries whose expiry passed (their node stopped refreshing them: it
-- died) and announce each departed user's logout exactly once: the script runs atomically, so
-- the first node to run it claims the departures and later runs find nothing. Every key is the
-- room's (one hash slot).
-- KEYS[1] room conns hash, KEYS[2] room users hash, KEYS[3] room expiry zset, KEYS[4] room
-- record, KEYS[5] the room's announcement counter
-- ARGV[1] now (ms), ARGV[2] batch limit, ARGV[3] channel, ARGV[4] envelope header,
-- ARGV[5] largest room size whose logouts are announced, ARGV[6] announcements per second,
-- ARGV[7] the logout's template
-- Returns the number of entries removed (the batch limit: call again).
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
local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, conn in ipairs(expired) do
  redis.call('ZREM', KEYS[3], conn)
  local entry = redis.call('HGET', KEYS[1], conn)
  local colon = entry and string.find(entry, ':', 1, true)
  local len = colon and tonumber(string.sub(entry, 1, colon - 1))
  if entry then
    redis.call('HDEL', KEYS[1], conn)
  end
  if len then
    local user = string.sub(entry, colon + 1, colon + len)
    local fragment = string.sub(entry, colon + len + 1)
    if redis.call('HINCRBY', KEYS[2], user, -1) <= 0 then
      redis.call('HDEL', KEYS[2], user)
      local num = redis.call('HLEN', KEYS[2])
      local room = redis.call('GET', KEYS[4])
      if num == 0 then
        redis.call('DEL', KEYS[4])
      end
      if room and num + 1 <= tonumber(ARGV[5]) and may_announce(KEYS[5], tonumber(ARGV[6])) then
        local nl = string.find(room, '\n', 1, true)
        redis.call('PUBLISH', ARGV[3], ARGV[4] .. render(ARGV[7], fragment,
          string.sub(room, 1, nl - 1), string.sub(room, nl + 1), num))
      end
    end
  end
end
return #expired
