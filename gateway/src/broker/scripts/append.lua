-- Append a message to a stream and publish it, atomically, in one round trip.
-- KEYS[1] stream, KEYS[2] dedup key or "" (none), KEYS[3] presence-users hash or "" (no count),
-- KEYS[4] trim marker (id of the newest entry trimmed away)
-- ARGV[1] MAXLEN, ARGV[2] dedup TTL ms, ARGV[3] channel,
-- ARGV[4] header before id, ARGV[5] header after id, ARGV[6] frame head (up to the id),
-- ARGV[7] frame body after the id, ARGV[8] frame tail after the count
-- Returns {id, created (1|0)}.
if KEYS[2] ~= "" then
  local previous = redis.call('GET', KEYS[2])
  if previous then return {previous, 0} end
end
local rest = ARGV[7]
if KEYS[3] ~= "" then
  rest = rest .. redis.call('HLEN', KEYS[3]) .. ARGV[8]
end
local id = redis.call('XADD', KEYS[1], '*', 'f', rest)
-- Trim in batches (amortised O(1) per message) and remember the newest id trimmed, so a
-- replay can tell a client exactly whether it missed anything. (Redis 7.0's XADD MAXLEN ~
-- does not record what it trimmed.)
local maxlen = tonumber(ARGV[1])
local len = redis.call('XLEN', KEYS[1])
if len > maxlen + math.max(1, math.floor(maxlen / 10)) then
  local trimmed = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', len - maxlen)
  redis.call('XTRIM', KEYS[1], 'MAXLEN', maxlen)
  redis.call('SET', KEYS[4], trimmed[#trimmed][1])
end
if KEYS[2] ~= "" then
  redis.call('SET', KEYS[2], id, 'PX', ARGV[2])
end
redis.call('PUBLISH', ARGV[3], ARGV[4] .. id .. ARGV[5] .. ARGV[6] .. id .. rest)
return {id, 1}
