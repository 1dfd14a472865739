-- KEYS: the partition's segs, active and offsets keys. ARGV: the cutoff (ms), the caller's owner epoch
-- ('' = unchecked), then per candidate segment its hash and its key base.
-- Deletes each candidate still idle since before the cutoff (one that got an event after the caller
-- picked it stays) with all its keys; returns the hash and name of each one deleted. Deletes nothing
-- when the partition has had a newer owner since: that owner may be training one of them.
if ARGV[2] ~= '' and tonumber(redis.call('HGET', KEYS[3], 'epoch') or '0') > tonumber(ARGV[2]) then
  return {}
end
local cutoff = tonumber(ARGV[1])
local out = {}
for i = 3, #ARGV, 2 do
  local h, base = ARGV[i], ARGV[i + 1]
  local last = redis.call('ZSCORE', KEYS[2], h)
  if last and tonumber(last) < cutoff then
    local name = redis.call('HGET', base .. 'meta', 'name') or ''
    redis.call('DEL', base .. 'meta', base .. 'new', base .. 'sample', base .. 'cand', base .. 'candz')
    redis.call('SREM', KEYS[1], h)
    redis.call('ZREM', KEYS[2], h)
    out[#out + 1] = h
    out[#out + 1] = name
  end
end
return out
