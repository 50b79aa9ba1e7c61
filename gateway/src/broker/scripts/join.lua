-- Record one connection's presence in a room; announce the user's login if it is the user's
-- first connection there.
-- KEYS[1] room conns hash, KEYS[2] room users hash, KEYS[3] expiry zset, KEYS[4] rooms hash
-- ARGV[1] conn key, ARGV[2] userId, ARGV[3] user fragment, ARGV[4] expires at (ms),
-- ARGV[5] room key, ARGV[6] room fragment, ARGV[7] channel, ARGV[8] envelope header,
-- ARGV[9] largest room size whose logins are announced
-- Returns {first (1|0), num, announced (1|0)}.
local added = redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. '\n' .. ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[5] .. '\n' .. ARGV[1])
local first = 0
if added == 1 and redis.call('HINCRBY', KEYS[2], ARGV[2], 1) == 1 then
  first = 1
end
redis.call('HSET', KEYS[4], ARGV[5], ARGV[6])
local num = redis.call('HLEN', KEYS[2])
local announced = 0
if first == 1 and num <= tonumber(ARGV[9]) then
  announced = 1
  redis.call('PUBLISH', ARGV[7], ARGV[8] .. '{"event":"login",' .. ARGV[3] .. ',' .. ARGV[6]
    .. ',"num":' .. num .. '}')
end
return {first, num, announced}
