-- KEYS: a segment's champion and moves keys.
-- ARGV: the version to serve again, the champion the operator expected to replace (0: none).
-- Returns {1, version} when moved; {0, champion} refused: the champion is no longer the expected one,
-- so a promotion that landed meanwhile is never undone unseen (fenced like registry_promote.lua).
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current ~= tonumber(ARGV[2]) then
  return {0, current}
end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('INCR', KEYS[2])
return {1, tonumber(ARGV[1])}
