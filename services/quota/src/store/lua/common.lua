-- Shared by every quota script. Counter hash fields: ut/uc used tokens/cost, rt/rc reserved
-- tokens/cost, n commits. Reservation zset members: "<reservation id>|<tokens>|<cost>", scored by
-- expiry (ms since epoch), so a counter can drop expired reservations without any other key.

-- Lua numbers would be sent as "1e+15"; counters need integer strings.
local function int(x)
  return string.format('%d', x)
end

-- Drops the counter's reservations that expired at or before `now`, releasing what they held. A
-- lease's hold (its member starts with "lse_") is also counted in lt / lc, the leased tokens / cost.
local function prune(counter, zset, now)
  local expired = redis.call('ZRANGEBYSCORE', zset, '-inf', now)
  if #expired == 0 then
    return
  end
  local tokens, cost, leased_tokens, leased_cost = 0, 0, 0, 0
  for _, member in ipairs(expired) do
    local t, c = string.match(member, '|(%d+)|(%d+)$')
    tokens = tokens + tonumber(t)
    cost = cost + tonumber(c)
    if string.sub(member, 1, 4) == 'lse_' then
      leased_tokens = leased_tokens + tonumber(t)
      leased_cost = leased_cost + tonumber(c)
    end
  end
  redis.call('ZREMRANGEBYSCORE', zset, '-inf', now)
  redis.call('HINCRBY', counter, 'rt', int(-tokens))
  redis.call('HINCRBY', counter, 'rc', int(-cost))
  if leased_tokens ~= 0 or leased_cost ~= 0 then
    redis.call('HINCRBY', counter, 'lt', int(-leased_tokens))
    redis.call('HINCRBY', counter, 'lc', int(-leased_cost))
  end
end

-- {used tokens, reserved tokens, used cost, reserved cost, commits}
local function read(counter)
  local v = redis.call('HMGET', counter, 'ut', 'rt', 'uc', 'rc', 'n')
  return {tonumber(v[1]) or 0, tonumber(v[2]) or 0, tonumber(v[3]) or 0, tonumber(v[4]) or 0, tonumber(v[5]) or 0}
end

-- read(), and whether the counter was seeded from the ledger, in one call.
local function read_seeded(counter)
  local v = redis.call('HMGET', counter, 'ut', 'rt', 'uc', 'rc', 'n', 's')
  local values = {tonumber(v[1]) or 0, tonumber(v[2]) or 0, tonumber(v[3]) or 0, tonumber(v[4]) or 0,
    tonumber(v[5]) or 0}
  return values, v[6] ~= false
end


-- Per-minute limits are leaky buckets, the continuous-state form of GCRA. A scope's bucket hash
-- holds the levels r (requests) and k (tokens), the limits rl / kl they drain by (that many per
-- 60000 ms) and t, the time of the last update (ms). Returns the levels drained to `now` and the
-- stored limits.
local function bucket_read(key, now)
  local v = redis.call('HMGET', key, 'r', 'k', 'rl', 'kl', 't')
  local r, k = tonumber(v[1]) or 0, tonumber(v[2]) or 0
  local rl, kl = tonumber(v[3]) or 0, tonumber(v[4]) or 0
  local elapsed = math.max(0, now - (tonumber(v[5]) or now))
  r = rl > 0 and math.max(0, r - elapsed * rl / 60000) or 0
  k = kl > 0 and math.max(0, k - elapsed * kl / 60000) or 0
  return r, k, rl, kl
end

-- Stores levels drained to `now`; the key expires once both buckets would be empty.
local function bucket_write(key, r, k, rl, kl, now)
  if r <= 0 and k <= 0 then
    redis.call('DEL', key)
    return
  end
  redis.call('HSET', key, 'r', tostring(r), 'k', tostring(k), 'rl', rl, 'kl', kl, 't', now)
  local minutes = 0
  if rl > 0 then minutes = math.max(minutes, r / rl) end
  if kl > 0 then minutes = math.max(minutes, k / kl) end
  redis.call('PEXPIRE', key, math.ceil(minutes * 60000) + 1000)
end

-- What leases hold of a scope's per-minute limits: a hash with the totals r (requests) and k
-- (tokens), which do not drain, and a zset of "<lease id>|<requests>|<tokens>" members scored by
-- expiry (ms), so an expired lease's hold comes back the next time any script touches the scope.
local function holds_prune(hash, zset, now)
  local expired = redis.call('ZRANGEBYSCORE', zset, '-inf', now)
  if #expired == 0 then
    return
  end
  local requests, tokens = 0, 0
  for _, member in ipairs(expired) do
    local r, k = string.match(member, '|(%d+)|(%d+)$')
    requests = requests + tonumber(r)
    tokens = tokens + tonumber(k)
  end
  redis.call('ZREMRANGEBYSCORE', zset, '-inf', now)
  redis.call('HINCRBY', hash, 'r', int(-requests))
  redis.call('HINCRBY', hash, 'k', int(-tokens))
end

-- The requests and tokens leases hold of a scope's per-minute limits.
local function holds_read(hash)
  local v = redis.call('HMGET', hash, 'r', 'k')
  return tonumber(v[1]) or 0, tonumber(v[2]) or 0
end

-- Milliseconds until `amount` more fits under `limit` in a bucket at `level` (draining at the limit
-- per minute) beside `held`, what leases hold (which does not drain). When draining alone cannot
-- make room, the wait is until the leases give their slices back: at most `held_wait` ms.
local function wait_ms(level, held, amount, limit, held_wait)
  local excess = level + held + amount - limit
  if excess <= level then
    return math.ceil(excess * 60000 / limit)
  end
  return math.max(math.ceil(level * 60000 / limit), held_wait)
end

local function split_lines(s)
  local out = {}
  for line in string.gmatch(s, '[^\n]+') do
    out[#out + 1] = line
  end
  return out
end
