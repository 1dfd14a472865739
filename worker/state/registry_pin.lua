-- KEYS: a segment's records, moves and pin keys.
-- ARGV: version, the pin or unpin record JSON, the pin JSON ('' : unpin).
-- The record, the pin and the move that makes the outbox republish the segment's scores land together,
-- so no reader sees a pin without its model-version event due, or the reverse.
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if ARGV[3] == '' then
  redis.call('DEL', KEYS[3])
else
  redis.call('SET', KEYS[3], ARGV[3])
end
redis.call('INCR', KEYS[2])
return 1
