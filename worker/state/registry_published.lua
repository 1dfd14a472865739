-- KEYS: a segment's published key (the outbox pointer).
-- ARGV: the highest version whose model-version event Kafka acknowledged, the champion moves whose
-- scores it acknowledged. Each field only moves forward: a slow publisher never marks work undone.
for i, field in ipairs({'version', 'moves'}) do
  local value = tonumber(ARGV[i])
  if value > tonumber(redis.call('HGET', KEYS[1], field) or '0') then
    redis.call('HSET', KEYS[1], field, value)
  end
end
return 1
