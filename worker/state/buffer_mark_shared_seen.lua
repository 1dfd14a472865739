-- KEYS: one of the group's shared-run marks (seen: sequence numbers; counted: partition counters).
-- ARGV: (field, number) pairs.
-- Each mark only moves forward: a slower or older shared run can never hand back events already taken.
local moved = 0
for i = 1, #ARGV, 2 do
  local old = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '0')
  if tonumber(ARGV[i + 1]) > old then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
    moved = moved + 1
  end
end
return moved
