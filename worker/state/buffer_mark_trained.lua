-- KEYS: a segment's meta and new keys, its partition's offsets key. ARGV: the last sequence number
-- trained on, now_ms, the owner epoch the training started under ('' = unchecked).
-- Drops the new events up to that number (later ones stay new) and starts the cooldown; returns -1 and
-- changes nothing when the partition has had a newer owner since (a revoked training trims nothing).
if ARGV[3] ~= '' and tonumber(redis.call('HGET', KEYS[3], 'epoch') or '0') > tonumber(ARGV[3]) then
  return -1
end
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
local seq_to = math.min(tonumber(ARGV[1]), seq)
local len = redis.call('LLEN', KEYS[2])
local n = math.min(seq_to - (seq - len + 1) + 1, len)
if n > 0 then
  local pos = 0
  for _, v in ipairs(redis.call('LRANGE', KEYS[2], 0, n - 1)) do
    if is_click(v) then pos = pos + 1 end
  end
  redis.call('LTRIM', KEYS[2], n, -1)
  redis.call('HINCRBY', KEYS[1], 'new_pos', 0 - pos)
  redis.call('HINCRBY', KEYS[1], 'new_neg', pos - n)
else
  n = 0
end
if seq_to > tonumber(redis.call('HGET', KEYS[1], 'trained_seq') or '0') then
  redis.call('HSET', KEYS[1], 'trained_seq', seq_to)
end
redis.call('HSET', KEYS[1], 'last_trained_ms', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'trainings', 1)
return n
