-- Remove presence entries whose expiry passed (their node stopped refreshing them: it died)
-- and announce each departed user's logout exactly once: the script runs atomically, so the
-- first node to run it claims the departures and later runs find nothing.
-- Builds room key names from the prefix and the encoded room key (see keys.rs); standalone
-- Redis only.
-- KEYS[1] expiry zset, KEYS[2] rooms hash
-- ARGV[1] now (ms), ARGV[2] batch limit, ARGV[3] key prefix, ARGV[4] envelope header,
-- ARGV[5] largest room size whose logouts are announced, ARGV[6] announcements per second,
-- ARGV[7] the logout announcement's template
-- Returns the number of entries removed.
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
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, member in ipairs(expired) do
  redis.call('ZREM', KEYS[1], member)
  -- `<encoded room>\n<conn>`: an encoded room key never holds a newline.
  local newline = string.find(member, '\n', 1, true)
  if newline then
    local room = string.sub(member, 1, newline - 1)
    local conn = string.sub(member, newline + 1)
    local base = ARGV[3] .. '{r:' .. room .. '}:'
    local entry = redis.call('HGET', base .. 'pc', conn)
    local colon = entry and string.find(entry, ':', 1, true)
    local len = colon and tonumber(string.sub(entry, 1, colon - 1))
    if entry then
      redis.call('HDEL', base .. 'pc', conn)
    end
    if len then
      local user = string.sub(entry, colon + 1, colon + len)
      local fragment = string.sub(entry, colon + len + 1)
      if redis.call('HINCRBY', base .. 'pu', user, -1) <= 0 then
        redis.call('HDEL', base .. 'pu', user)
        local num = redis.call('HLEN', base .. 'pu')
        local room_record = redis.call('HGET', KEYS[2], room)
        if num == 0 then
          redis.call('HDEL', KEYS[2], room)
        end
        if room_record and num + 1 <= tonumber(ARGV[5])
            and may_announce(base .. 'an', tonumber(ARGV[6])) then
          local nl = string.find(room_record, '\n', 1, true)
          redis.call('PUBLISH', base .. 'ch', ARGV[4] .. render(ARGV[7], fragment,
            string.sub(room_record, 1, nl - 1), string.sub(room_record, nl + 1), num))
        end
      end
    end
  end
end
return #expired
