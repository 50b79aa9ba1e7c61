-- Record one connection's presence in a room; announce the user's login if it is the user's
-- first connection there. The room keeps the name its first joiner gave while anyone is in it.
-- Every key is the room's (one hash slot): the script runs as it is on Redis Cluster.
-- KEYS[1] room conns hash, KEYS[2] room users hash, KEYS[3] room expiry zset (conn -> expires
-- at), KEYS[4] room record, KEYS[5] the room's announcement counter
-- ARGV[1] conn key, ARGV[2] userId, ARGV[3] user fragment, ARGV[4] expires at (ms),
-- ARGV[5] room record (`<roomId JSON>\n<roomName JSON>`), ARGV[6] channel, ARGV[7] envelope
-- header, ARGV[8] largest room size whose logins are announced, ARGV[9] roomId JSON as this
-- joiner wrote it, ARGV[10] announcements per second, ARGV[11] the login's template,
-- ARGV[12] now (ms), ARGV[13] the logout's template
-- Expired entries of the room (their node died) are pruned first, with their logouts: a room
-- whose every node crashed long ago is corrected by its next join, whatever the index says.
-- Records are length-prefixed (`<len(userId)>:<userId><fragment>`): no byte of a client
-- string can be taken for a separator.
-- Returns {first (1|0), num, announced (1|0), roomName JSON}.
prune_expired(ARGV[12], 100, {ARGV[6], ARGV[7], ARGV[8], ARGV[10], ARGV[13]})
local record = string.len(ARGV[2]) .. ':' .. ARGV[2] .. ARGV[3]
local added = redis.call('HSET', KEYS[1], ARGV[1], record)
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
local first = 0
if added == 1 and redis.call('HINCRBY', KEYS[2], ARGV[2], 1) == 1 then
  first = 1
end
redis.call('SETNX', KEYS[4], ARGV[5])
local room = redis.call('GET', KEYS[4])
local name = string.sub(room, string.find(room, '\n', 1, true) + 1)
local num = redis.call('HLEN', KEYS[2])
local announced = 0
if first == 1 and num <= tonumber(ARGV[8]) and may_announce(tonumber(ARGV[10])) then
  announced = 1
  redis.call('PUBLISH', ARGV[6], ARGV[7] .. render(ARGV[11], ARGV[3], ARGV[9], name, num))
end
return {first, num, announced, name}
