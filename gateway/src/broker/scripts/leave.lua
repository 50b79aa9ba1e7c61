-- Remove one connection's presence in a room; announce the user's logout if it was the user's
-- last connection there. Every key is the room's (one hash slot).
-- KEYS[1] room conns hash, KEYS[2] room users hash, KEYS[3] room expiry zset, KEYS[4] room
-- record, KEYS[5] the room's announcement counter
-- ARGV[1] conn key, ARGV[2] roomId JSON, ARGV[3] roomName JSON, ARGV[4] channel,
-- ARGV[5] envelope header, ARGV[6] largest room size whose logouts are announced,
-- ARGV[7] announcements per second, ARGV[8] the logout's template
-- Returns {last (1|0), num}.
redis.call('ZREM', KEYS[3], ARGV[1])
local entry = redis.call('HGET', KEYS[1], ARGV[1])
if not entry then
  return {0, redis.call('HLEN', KEYS[2])}
end
redis.call('HDEL', KEYS[1], ARGV[1])
-- `<len(userId)>:<userId><user fragment>`
local colon = string.find(entry, ':', 1, true)
local len = colon and tonumber(string.sub(entry, 1, colon - 1))
if not len then
  return {0, redis.call('HLEN', KEYS[2])} -- not a record this version wrote
end
local user = string.sub(entry, colon + 1, colon + len)
local fragment = string.sub(entry, colon + len + 1)
local last = 0
if redis.call('HINCRBY', KEYS[2], user, -1) <= 0 then
  redis.call('HDEL', KEYS[2], user)
  last = 1
end
local num = redis.call('HLEN', KEYS[2])
if num == 0 then
  redis.call('DEL', KEYS[4]) -- nobody left: the next first joiner names the room
end
if last == 1 and num + 1 <= tonumber(ARGV[6]) and may_announce(tonumber(ARGV[7])) then
  redis.call('PUBLISH', ARGV[4], ARGV[5] .. render(ARGV[8], fragment, ARGV[2], ARGV[3], num))
end
return {last, num}
