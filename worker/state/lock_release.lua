-- KEYS[1]: the lock. ARGV[1]: the holder's token.
-- Deletes the lock only if it still holds this token: never one another holder took after it expired.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
