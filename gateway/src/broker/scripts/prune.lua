-- Remove presence entries whose expiry passed (their node stopped refreshing them: it died)
-- and announce each departed user's logout exactly once: the script runs atomically, so the
-- first node to run it claims the departures and later runs find nothing.
-- Builds room key names from the prefix (see keys.rs); standalone Redis only.
-- KEYS[1] expiry zset, KEYS[2] rooms hash
-- ARGV[1] now (ms), ARGV[2] batch limit, ARGV[3] key prefix, ARGV[4] envelope header,
-- ARGV[5] largest room size whose logouts are announced
-- Returns the number of entries removed.
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, member in ipairs(expired) do
  redis.call('ZREM', KEYS[1], member)
  local newline = string.find(member, '\n', 1, true)
  local room = string.sub(member, 1, newline - 1)
  local conn = string.sub(member, newline + 1)
  local base = ARGV[3] .. '{r:' .. room .. '}:'
  local entry = redis.call('HGET', base .. 'pc', conn)
  if entry then
    redis.call('HDEL', base .. 'pc', conn)
    local nl = string.find(entry, '\n', 1, true)
    local user = string.sub(entry, 1, nl - 1)
    local fragment = string.sub(entry, nl + 1)
    if redis.call('HINCRBY', base .. 'pu', user, -1) <= 0 then
      redis.call('HDEL', base .. 'pu', user)
      local num = redis.call('HLEN', base .. 'pu')
      local room_fragment = redis.call('HGET', KEYS[2], room)
      if num == 0 then
        redis.call('HDEL', KEYS[2], room)
      end
      if room_fragment and num + 1 <= tonumber(ARGV[5]) then
        redis.call('PUBLISH', base .. 'ch', ARGV[4] .. '{"event":"logout",' .. fragment .. ','
          .. room_fragment .. ',"num":' .. num .. '}')
      end
    end
  end
end
return #expired
