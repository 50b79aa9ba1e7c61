-- Read a page of a stream after a position, and whether entries after it were trimmed.
-- KEYS[1] stream
-- ARGV[1] exclusive start id, ARGV[2] count
-- Returns {max deleted entry id, entries}.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'0-0', {}}
end
local info = redis.call('XINFO', 'STREAM', KEYS[1])
local max_deleted = '0-0'
for i = 1, #info, 2 do
  if info[i] == 'max-deleted-entry-id' then max_deleted = info[i + 1] end
end
return {max_deleted, redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+', 'COUNT', ARGV[2])}
