-- Shared by the presence scripts (join, leave, prune_room, refresh_room): `Scripts::load` puts
-- this file before each. They all take the room's keys in the same order:
-- KEYS[1] conns hash, KEYS[2] users hash, KEYS[3] expiry zset, KEYS[4] room record,
-- KEYS[5] announcement counter.

-- Fill an announcement template from Rust (protocol::Announcement): bytes 1-4 stand for the
-- user fragment, room id JSON, room name JSON and count. The scripts never write client JSON.
local function render(template, user, room_id, room_name, num)
  local values = {['\1'] = user, ['\2'] = room_id, ['\3'] = room_name, ['\4'] = tostring(num)}
  return (string.gsub(template, '[\1-\4]', values))
end

-- At most `cap` announcements per room and second, whoever toggles (a client joining and
-- leaving in a loop, or many clients at once, cannot flood the room with presence frames).
local function may_announce(cap)
  local n = redis.call('INCR', KEYS[5])
  if n == 1 then redis.call('PEXPIRE', KEYS[5], 1000) end
  return n <= cap
end

-- Removes up to `limit` of the room's entries that expired by `now` (their node stopped
-- refreshing them) and publishes each departed user's logout once (`announce` =
-- {channel, header, largest announced room, announcements per second, logout template}).
-- A room left empty loses its record, so its next first joiner names it. Returns the count.
local function prune_expired(now, limit, announce)
  local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, limit)
  for _, conn in ipairs(expired) do
    redis.call('ZREM', KEYS[3], conn)
    local entry = redis.call('HGET', KEYS[1], conn)
    local colon = entry and string.find(entry, ':', 1, true)
    local len = colon and tonumber(string.sub(entry, 1, colon - 1))
    if entry then
      redis.call('HDEL', KEYS[1], conn)
    end
    -- `<len(userId)>:<userId><user fragment>`
    if len then
      local user = string.sub(entry, colon + 1, colon + len)
      if redis.call('HINCRBY', KEYS[2], user, -1) <= 0 then
        redis.call('HDEL', KEYS[2], user)
        local num = redis.call('HLEN', KEYS[2])
        local room = redis.call('GET', KEYS[4])
        if num == 0 then
          redis.call('DEL', KEYS[4])
        end
        if room and num + 1 <= tonumber(announce[3]) and may_announce(tonumber(announce[4])) then
          local nl = string.find(room, '\n', 1, true)
          redis.call('PUBLISH', announce[1], announce[2] .. render(announce[5],
            string.sub(entry, colon + len + 1), string.sub(room, 1, nl - 1),
            string.sub(room, nl + 1), num))
        end
      end
    end
  end
  return #expired
end
