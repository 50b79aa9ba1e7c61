-- Append a message to a stream and publish it, atomically, in one round trip.
-- KEYS[1] stream, KEYS[2] dedup key, KEYS[3] presence-users hash (the count), KEYS[4] trim
-- marker (id of the newest entry trimmed away), KEYS[5] a key that must exist. KEYS 2, 3 and 5
-- are optional: ARGV[11] says which are in use (`d`, `c`, `r`); an unused one is the stream's own
-- name, so that every key of the call is in one hash slot (Redis Cluster).
-- ARGV[1] MAXLEN, ARGV[2] dedup TTL ms, ARGV[3] channel,
-- ARGV[4] header before id, ARGV[5] header after id, ARGV[6] frame head (up to the id),
-- ARGV[7] frame body after the id, ARGV[8] frame tail after the count,
-- ARGV[9] "refuse" (a full stream refuses) or "trim" (a full stream drops its oldest),
-- ARGV[10] TTL ms of the stream and its marker (renewed by every append), ARGV[11] the optional
-- keys in use
-- Returns {id, 1} (appended), {id, 0} (a retried clientMsgId), {'', -1} (KEYS[5] missing),
-- {'', -2} (full).
local dedup = string.find(ARGV[11], 'd', 1, true)
local counted = string.find(ARGV[11], 'c', 1, true)
local required = string.find(ARGV[11], 'r', 1, true)
if dedup then
  local previous = redis.call('GET', KEYS[2])
  if previous then return {previous, 0} end
end
if required and redis.call('EXISTS', KEYS[5]) == 0 then
  return {'', -1}
end
local maxlen = tonumber(ARGV[1])
if ARGV[9] == 'refuse' and redis.call('XLEN', KEYS[1]) >= maxlen then
  return {'', -2}
end
local rest = ARGV[7]
if counted then
  rest = rest .. redis.call('HLEN', KEYS[3]) .. ARGV[8]
end
local id = redis.call('XADD', KEYS[1], '*', 'f', rest)
-- Trim in batches (amortised O(1) per message) and remember the newest id trimmed, so a
-- replay can tell a client exactly whether it missed anything. (Redis 7.0's XADD MAXLEN ~
-- does not record what it trimmed.)
local len = redis.call('XLEN', KEYS[1])
if len > maxlen + math.max(1, math.floor(maxlen / 10)) then
  local trimmed = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', len - maxlen)
  redis.call('XTRIM', KEYS[1], 'MAXLEN', maxlen)
  redis.call('SET', KEYS[4], trimmed[#trimmed][1])
end
-- Idle rooms and inboxes expire as a whole.
redis.call('PEXPIRE', KEYS[1], ARGV[10])
redis.call('PEXPIRE', KEYS[4], ARGV[10])
if dedup then
  redis.call('SET', KEYS[2], id, 'PX', ARGV[2])
end
redis.call('PUBLISH', ARGV[3], ARGV[4] .. id .. ARGV[5] .. ARGV[6] .. id .. rest)
return {id, 1}
