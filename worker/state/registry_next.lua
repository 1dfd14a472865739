-- KEYS: a segment's next and name keys.
-- ARGV: the highest version the model store holds for the segment (0: none), the segment's name.
-- Returns the reserved version: above every number handed out and every version on disk, so a Redis
-- that lost its data never hands out a number again; INCR keeps two callers from getting the same one.
local version = redis.call('INCR', KEYS[1])
local stored = tonumber(ARGV[1])
if version <= stored then
  version = stored + 1
  redis.call('SET', KEYS[1], version)
end
redis.call('SET', KEYS[2], ARGV[2])
return version
