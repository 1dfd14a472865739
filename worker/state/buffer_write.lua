-- KEYS: the partition's offsets, dedup, stats, segs and active keys (worker.state.keys).
-- ARGV: now_ms, dedup cutoff ms, dedup_max_ids, new_events_cap, sample_cap, candidates_cap, next offset,
-- segments, dead letters, lowest offset, the blob, the writer's owner epoch ('' = unchecked), the stored
-- next offset the writer continues from ('' = unchecked, -1 = none), then (offset, code) per dead letter.
-- Replies 'fenced,<epoch>' (a newer owner took the partition) or 'rewind,<next>' (Redis is behind the
-- writer: it lost data, so the events in between would never be buffered) and changes nothing then.
-- The blob is one string, fields split by \255: per segment its hash, its key base, its name and its
-- event count, then per event its offset, id, entry and pair key.
-- `cmd` over `flat` in chunks (Lua's unpack has a stack limit); returns the last reply, or with `sum`
-- the sum of the replies (ZADD's count of new members is per chunk, a list's length is not).
local function chunked(cmd, key, flat, step, sum)
  local r = 0
  for s = 1, #flat, step do
    local got = redis.call(cmd, key, unpack(flat, s, math.min(s + step - 1, #flat)))
    if sum then r = r + got else r = got end
  end
  return r
end
local now = ARGV[1]
local dedup_max, new_cap = tonumber(ARGV[3]), tonumber(ARGV[4])
local sample_cap, cand_cap = tonumber(ARGV[5]), tonumber(ARGV[6])
local nseg, ndead = tonumber(ARGV[8]), tonumber(ARGV[9])
local stored = tonumber(redis.call('HGET', KEYS[1], 'next') or '-1')
if ARGV[12] ~= '' then
  local epoch = tonumber(redis.call('HGET', KEYS[1], 'epoch') or '0')
  if epoch > tonumber(ARGV[12]) then return 'fenced,' .. epoch end
  if epoch < tonumber(ARGV[12]) then redis.call('HSET', KEYS[1], 'epoch', ARGV[12]) end
end
if ARGV[13] ~= '' and stored < tonumber(ARGV[13]) then return 'rewind,' .. stored end
local check = stored > tonumber(ARGV[10])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[2])
local function split(s)
  local t, pos = {}, 1
  while true do
    local e = string.find(s, '\255', pos, true)
    if not e then
      t[#t + 1] = string.sub(s, pos)
      return t
    end
    t[#t + 1] = string.sub(s, pos, e - 1)
    pos = e + 1
  end
end
local ids, segs, hs, bases, names = {}, {}, {}, {}, {}
local blob = split(ARGV[11])
local at = 1
for i = 1, nseg do
  hs[i], bases[i], names[i] = blob[at], blob[at + 1], blob[at + 2]
  local first, last = at + 4, at + 3 + 4 * tonumber(blob[at + 3])
  segs[i] = {first, last}
  for b = first + 1, last, 4 do ids[#ids + 1] = blob[b] end
  at = last + 1
end
local deadbase = 14
local known = {}
for s = 1, #ids, 4000 do
  local part = redis.call('ZMSCORE', KEYS[2], unpack(ids, s, math.min(s + 3999, #ids)))
  for j = 1, #part do known[s + j - 1] = part[j] end
end
local seen, fresh = {}, {}
local idx, added, dups, stale = 0, 0, 0, 0
local out = {0, 0, 0, 0}
for i = 1, nseg do
  local f = blob
  local items, prs, pos, dup = {}, {}, 0, 0
  for b = segs[i][1], segs[i][2], 4 do
    idx = idx + 1
    local id = f[b + 1]
    if check and tonumber(f[b]) < stored then
      stale = stale + 1
    elseif known[idx] or seen[id] then
      dup = dup + 1
    else
      seen[id] = true
      fresh[#fresh + 1] = now
      fresh[#fresh + 1] = id
      local item = f[b + 2]
      items[#items + 1] = item
      prs[#prs + 1] = f[b + 3]
      if is_click(item) then pos = pos + 1 end
    end
  end
  local n = #items
  if n > 0 or dup > 0 then
    local k0 = bases[i]
    local meta, new, sample = k0 .. 'meta', k0 .. 'new', k0 .. 'sample'
    local cand, candz = k0 .. 'cand', k0 .. 'candz'
    local m = redis.call('HMGET', meta, 'seq', 'pos', 'neg', 'new_pos', 'new_neg', 'dropped', 'duplicates',
      'ncand', 'last_trained_ms')
    local seq = tonumber(m[1] or '0')
    local new_pos, new_neg = tonumber(m[4] or '0') + pos, tonumber(m[5] or '0') + n - pos
    local dropped, ncand = tonumber(m[6] or '0'), tonumber(m[8] or '0')
    local newlen = 0
    if n > 0 then
      if seq == 0 then
        redis.call('HSET', meta, 'name', names[i])
        redis.call('SADD', KEYS[4], hs[i])
      end
      redis.call('ZADD', KEYS[5], now, hs[i])
      newlen = chunked('RPUSH', new, items, 4000)
      if newlen > new_cap then
        local drop = newlen - new_cap
        local dpos = 0
        for _, v in ipairs(redis.call('LRANGE', new, 0, drop - 1)) do
          if is_click(v) then dpos = dpos + 1 end
        end
        redis.call('LTRIM', new, drop, -1)
        dropped = dropped + drop
        new_pos, new_neg = new_pos - dpos, new_neg - (drop - dpos)
        newlen = new_cap
      end
      if chunked('RPUSH', sample, items, 4000) > sample_cap then
        redis.call('LTRIM', sample, -sample_cap, -1)
      end
      local hflat, zflat = {}, {}
      for j = 1, n do
        hflat[2 * j - 1] = prs[j]
        hflat[2 * j] = items[j]
        zflat[2 * j - 1] = seq + j
        zflat[2 * j] = prs[j]
      end
      chunked('HSET', cand, hflat, 4000)
      ncand = ncand + chunked('ZADD', candz, zflat, 4000, true)
      if ncand > cand_cap then
        local gone = redis.call('ZPOPMIN', candz, ncand - cand_cap)
        local fields = {}
        for j = 1, #gone, 2 do fields[#fields + 1] = gone[j] end
        chunked('HDEL', cand, fields, 4000)
        ncand = cand_cap
      end
      seq = seq + n
      added = added + n
      out[#out + 1] = i
      out[#out + 1] = seq
      out[#out + 1] = newlen
      out[#out + 1] = new_pos
      out[#out + 1] = new_neg
      out[#out + 1] = m[9] or '0'
    end
    redis.call('HSET', meta, 'seq', seq, 'pos', tonumber(m[2] or '0') + pos,
      'neg', tonumber(m[3] or '0') + n - pos, 'new_pos', new_pos, 'new_neg', new_neg, 'dropped', dropped,
      'duplicates', tonumber(m[7] or '0') + dup, 'ncand', ncand)
    dups = dups + dup
  end
end
for s = 1, #fresh, 4000 do
  redis.call('ZADD', KEYS[2], unpack(fresh, s, math.min(s + 3999, #fresh)))
end
local dead = 0
local codes = {}
for b = deadbase, deadbase + ndead * 2 - 1, 2 do
  if tonumber(ARGV[b]) >= stored then
    codes[ARGV[b + 1]] = (codes[ARGV[b + 1]] or 0) + 1
    dead = dead + 1
  else
    stale = stale + 1
  end
end
for code, c in pairs(codes) do redis.call('HINCRBY', KEYS[3], 'dlq.' .. code, c) end
if dead > 0 then redis.call('HINCRBY', KEYS[3], 'dlq', dead) end
if added > 0 then redis.call('HINCRBY', KEYS[3], 'events', added) end
if dups > 0 then redis.call('HINCRBY', KEYS[3], 'duplicates', dups) end
if stale > 0 then redis.call('HINCRBY', KEYS[3], 'stale', stale) end
if tonumber(ARGV[7]) > stored then redis.call('HSET', KEYS[1], 'next', ARGV[7]) end
if #fresh > 0 then
  local ndedup = redis.call('ZCARD', KEYS[2])
  if ndedup > dedup_max then redis.call('ZREMRANGEBYRANK', KEYS[2], 0, ndedup - dedup_max - 1) end
end
out[1], out[2], out[3], out[4] = added, dups, stale, dead
return table.concat(out, ',')
