-- Push the expiry of a node's live presence entries in one room forward; re-create entries that
-- vanished (Redis flushed or restarted empty, or another node pruned them while this node was
-- stalled) and announce the login of each user who was absent, so members' lists come right
-- again. Every key is the room's (one hash slot).
-- KEYS[1] room conns hash, KEYS[2] room users hash, KEYS[3] room expiry zset, KEYS[4] room
-- record, KEYS[5] the room's announcement counter
-- ARGV[1] expires at (ms), ARGV[2] channel, ARGV[3] envelope header, ARGV[4] largest room size
-- whose logins are announced, ARGV[5] announcements per second, ARGV[6] the login's template,
-- ARGV[7] the room record, then per entry three values: conn key, userId, presence record
-- Returns the number of entries re-created.
local restored = 0
for i = 8, #ARGV, 3 do
  local conn, user, record = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if redis.call('HSETNX', KEYS[1], conn, record) == 1 then
    local first = redis.call('HINCRBY', KEYS[2], user, 1) == 1
    redis.call('SETNX', KEYS[4], ARGV[7])
    restored = restored + 1
    local num = redis.call('HLEN', KEYS[2])
    if first and num <= tonumber(ARGV[4]) and may_announce(tonumber(ARGV[5])) then
      -- `<len(userId)>:<userId><user fragment>` and `<roomId JSON>\n<roomName JSON>`
      local colon = string.find(record, ':', 1, true)
      local fragment = string.sub(record, colon + tonumber(string.sub(record, 1, colon - 1)) + 1)
      local room = redis.call('GET', KEYS[4])
      local nl = string.find(room, '\n', 1, true)
      redis.call('PUBLISH', ARGV[2], ARGV[3] .. render(ARGV[6], fragment,
        string.sub(room, 1, nl - 1), string.sub(room, nl + 1), num))
    end
  end
  redis.call('ZADD', KEYS[3], ARGV[1], conn)
end
return restored
