-- KEYS: a segment's records, champion, moves, serving and pin keys.
-- ARGV: version, record JSON, '1' if promoted, the champion version the challenger was gated against,
-- the segment's serving choice JSON ('' : unchanged).
-- Returns {status, champion}: 1 stored and now champion; 0 stored (not promoted); 2 refused, nothing
-- stored: the champion is no longer the one the challenger was gated against (fenced promotion);
-- 3 refused, nothing stored: an operator pinned the segment (`state.pins`), which promotes nothing.
-- A champion move counts in `moves`, which the outbox compares with what it published scores for; so
-- does a change of what serves the segment, which changes its scores as much.
local current = tonumber(redis.call('GET', KEYS[2]) or '0')
if ARGV[3] == '1' and redis.call('EXISTS', KEYS[5]) == 1 then
  return {3, current}
end
if ARGV[3] == '1' and current ~= tonumber(ARGV[4]) then
  return {2, current}
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
local moved = false
if ARGV[5] ~= '' then
  local before = cjson.decode(redis.call('GET', KEYS[4]) or '{"kind":"shared"}')
  moved = cjson.decode(ARGV[5])['kind'] ~= before['kind']
  redis.call('SET', KEYS[4], ARGV[5])
end
if ARGV[3] == '1' then
  redis.call('SET', KEYS[2], ARGV[1])
  redis.call('INCR', KEYS[3])
  return {1, tonumber(ARGV[1])}
end
if moved then
  redis.call('INCR', KEYS[3])
end
return {0, current}
