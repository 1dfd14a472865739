-- KEYS: a segment's records and champion keys. ARGV: version, record JSON, '1' if promoted.
local current = tonumber(redis.call('GET', KEYS[2]) or '0')
local version = tonumber(ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if ARGV[3] == '1' and version > current then
  redis.call('SET', KEYS[2], ARGV[1])
  return 1
end
return 0
