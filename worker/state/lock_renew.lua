-- KEYS[1]: the lock. ARGV[1]: the holder's token, ARGV[2]: the new TTL in milliseconds.
-- Extends the lock only if it still holds this token; 0 tells the holder it has lost it.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
