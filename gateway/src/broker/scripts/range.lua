-- Read a page of a stream after a position, and the newest id trimmed away (if any).
-- KEYS[1] stream, KEYS[2] trim marker
-- ARGV[1] exclusive start id, ARGV[2] count
-- Returns {newest trimmed id or '0-0', entries}.
local trimmed = redis.call('GET', KEYS[2]) or '0-0'
return {trimmed, redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+', 'COUNT', ARGV[2])}
