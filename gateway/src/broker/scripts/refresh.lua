-- Push the expiry of a node's live presence entries forward; re-create entries that vanished
-- (Redis flushed or restarted empty) without announcing them again.
-- Builds room key names from the prefix and the encoded room key (see keys.rs); standalone
-- Redis only.
-- KEYS[1] expiry zset, KEYS[2] rooms hash
-- ARGV[1] expires at (ms), ARGV[2] key prefix, then per entry five values:
-- encoded room key, conn key, userId, presence record, room record
-- Returns the number of entries re-created.
local restored = 0
for i = 3, #ARGV, 5 do
  local room, conn, user = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local base = ARGV[2] .. '{r:' .. room .. '}:'
  if redis.call('HSETNX', base .. 'pc', conn, ARGV[i + 3]) == 1 then
    redis.call('HINCRBY', base .. 'pu', user, 1)
    redis.call('HSETNX', KEYS[2], room, ARGV[i + 4])
    restored = restored + 1
  end
  redis.call('ZADD', KEYS[1], ARGV[1], room .. '\n' .. conn)
end
return restored
