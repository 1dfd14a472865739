-- KEYS: the partition's offsets, dedup, stats, segs and active keys (worker.state.keys).
-- ARGV: the stored next offset read when planning ('' = none), the owner epoch read then ('' = none), the
-- new next offset, events to take off the counters, duplicates, dead letters, then the counts of dead
-- letter codes, of dedup ids and of segments, then (code, n) per code, the ids, and per segment its hash,
-- its key base, how many of its stored events to take back (k), how many of those were clicks, and how
-- many duplicates it counted in the replayed range.
-- The k events taken back are the last k the segment stored (a partition's events reach a segment in
-- offset order); its lists lose their last k entries at most, its candidates those last seen among
-- them. Replies 'changed' and changes nothing when the offsets or the epoch moved since planning (a
-- worker took the partition), else 'ok'.
local function same(field, expected)
  local now = redis.call('HGET', KEYS[1], field)
  return (now or '') == expected
end
if not same('next', ARGV[1]) or not same('epoch', ARGV[2]) then return 'changed' end
local function chunked(cmd, key, flat)
  for s = 1, #flat, 4000 do
    redis.call(cmd, key, unpack(flat, s, math.min(s + 3999, #flat)))
  end
end
local ncodes, nids, nseg = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local at = 10
for _ = 1, ncodes do
  redis.call('HINCRBY', KEYS[3], 'dlq.' .. ARGV[at], 0 - tonumber(ARGV[at + 1]))
  at = at + 2
end
local ids = {}
for i = 1, nids do ids[i] = ARGV[at + i - 1] end
at = at + nids
if #ids > 0 then chunked('ZREM', KEYS[2], ids) end
for _ = 1, nseg do
  local h, base = ARGV[at], ARGV[at + 1]
  local k, kpos, dups = tonumber(ARGV[at + 2]), tonumber(ARGV[at + 3]), tonumber(ARGV[at + 4])
  at = at + 5
  local meta, new, sample = base .. 'meta', base .. 'new', base .. 'sample'
  local cand, candz = base .. 'cand', base .. 'candz'
  local m = redis.call('HMGET', meta, 'seq', 'trained_seq', 'dropped')
  local seq = tonumber(m[1] or '0')
  local left = math.max(0, seq - k)
  if left == 0 and seq > 0 then
    redis.call('DEL', meta, new, sample, cand, candz)
    redis.call('SREM', KEYS[4], h)
    redis.call('ZREM', KEYS[5], h)
  elseif seq > 0 then
    local newlen = redis.call('LLEN', new)
    local rn = math.min(k, newlen)
    local rpos = 0
    if rn > 0 then
      for _, v in ipairs(redis.call('LRANGE', new, -rn, -1)) do
        if is_click(v) then rpos = rpos + 1 end
      end
      redis.call('LTRIM', new, 0, -rn - 1)
    end
    local rs = math.min(k, redis.call('LLEN', sample))
    if rs > 0 then redis.call('LTRIM', sample, 0, -rs - 1) end
    local gone = redis.call('ZRANGEBYSCORE', candz, '(' .. left, '+inf')
    if #gone > 0 then
      chunked('HDEL', cand, gone)
      chunked('ZREM', candz, gone)
    end
    local trained = tonumber(m[2] or '0')
    -- Taken-back events that are in neither list were dropped by the cap, unless a training took them.
    local dropped = math.max(0, seq - newlen - math.max(left, trained))
    redis.call('HINCRBY', meta, 'pos', 0 - kpos)
    redis.call('HINCRBY', meta, 'neg', kpos - k)
    redis.call('HINCRBY', meta, 'new_pos', 0 - rpos)
    redis.call('HINCRBY', meta, 'new_neg', rpos - rn)
    redis.call('HINCRBY', meta, 'ncand', 0 - #gone)
    redis.call('HINCRBY', meta, 'duplicates', 0 - dups)
    redis.call('HSET', meta, 'seq', left, 'dropped', math.max(0, tonumber(m[3] or '0') - dropped))
    if trained > left then redis.call('HSET', meta, 'trained_seq', left) end
  end
end
local events, dups, dead = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
if events > 0 then redis.call('HINCRBY', KEYS[3], 'events', 0 - events) end
if dups > 0 then redis.call('HINCRBY', KEYS[3], 'duplicates', 0 - dups) end
if dead > 0 then redis.call('HINCRBY', KEYS[3], 'dlq', 0 - dead) end
redis.call('HSET', KEYS[1], 'next', ARGV[3])
redis.call('HINCRBY', KEYS[1], 'epoch', 1)
return 'ok'
