-- KEYS: a segment's records, champion and moves keys.
-- ARGV: version, record JSON, '1' if promoted, the champion version the challenger was gated against.
-- Returns {status, champion}: 1 stored and now champion; 0 stored (not promoted); 2 refused, nothing
-- stored: the champion is no longer the one the challenger was gated against (fenced promotion).
-- A champion move counts in `moves`, which the outbox compares with what it published scores for.
local current = tonumber(redis.call('GET', KEYS[2]) or '0')
if ARGV[3] == '1' and current ~= tonumber(ARGV[4]) then
  return {2, current}
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if ARGV[3] == '1' then
  redis.call('SET', KEYS[2], ARGV[1])
  redis.call('INCR', KEYS[3])
  return {1, tonumber(ARGV[1])}
end
return {0, current}
