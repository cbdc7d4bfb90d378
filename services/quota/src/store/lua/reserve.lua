-- Reserve an amount against every counter: all admit it or nothing changes.
-- KEYS[1] limits generation, KEYS[2] reservation record, and per counter i (i = 1..n):
-- KEYS[5i-2] counter hash, KEYS[5i-1] reservation zset, KEYS[5i] per-minute bucket,
-- KEYS[5i+1] / KEYS[5i+2] what leases hold of the scope's per-minute limits (hash / zset).
-- ARGV[1] expected limits generation ('' = none), ARGV[2] now (ms), ARGV[3] expiry (ms),
-- ARGV[4] tokens, ARGV[5] cost, ARGV[6] zset member, ARGV[7] record TTL (ms),
-- ARGV[8] counter TTL (ms), ARGV[9] newline-separated counter key suffixes (kept for settling),
-- ARGV[10] the wait (ms) to tell a request refused only because leases hold the budget,
-- ARGV[11] the wall-clock instant (ms) from which the script must not act (its caller gave up),
-- ARGV[4i+8] .. ARGV[4i+11] tokens/day, cost/day, requests/minute, tokens/minute limits of
-- counter i (0 = unlimited).
-- Returns {4} when run too late (nothing changed); {2} when limits changed; {3, i...} when counters i were never seeded from the ledger;
-- {0, existing, counters...} when admitted; {1, i, limit, retry ms, counters...} when counter i
-- refuses (limit: 0 tokens/day, 1 cost/day, 2 requests/minute, 3 tokens/minute; retry ms 0 for a
-- daily limit means at the window's reset). Seven integers per counter: five daily values and the
-- two per-minute levels, what leases hold included.
-- Run after its caller gave up (Redis was stalled with it queued): a hold made now would be
-- held by nobody until its TTL.
local clock = redis.call('TIME')
if tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000) >= tonumber(ARGV[11]) then
  return {4}
end

local generation = redis.call('GET', KEYS[1]) or ''
if generation ~= ARGV[1] then
  return {2}
end

local now = tonumber(ARGV[2])
local n = (#KEYS - 2) / 5
local tokens = tonumber(ARGV[4])
local cost = tonumber(ARGV[5])
local held_wait = tonumber(ARGV[10])

local function limit(i, j)
  return tonumber(ARGV[4 * i + 7 + j])
end

-- Seeded-ness is read with the counter: field 6 of read_seeded.
local states, levels, held, seeded = {}, {}, {}, {}
for i = 1, n do
  prune(KEYS[5 * i - 2], KEYS[5 * i - 1], ARGV[2])
  states[i], seeded[i] = read_seeded(KEYS[5 * i - 2])
  if limit(i, 3) > 0 or limit(i, 4) > 0 then
    local r, k = bucket_read(KEYS[5 * i], now)
    levels[i] = {r, k}
    holds_prune(KEYS[5 * i + 1], KEYS[5 * i + 2], ARGV[2])
    local hr, hk = holds_read(KEYS[5 * i + 1])
    held[i] = {hr, hk}
  else
    levels[i] = {0, 0}
    held[i] = {0, 0}
  end
end

local function reply(head)
  for i = 1, n do
    for j = 1, 5 do
      head[#head + 1] = states[i][j]
    end
    head[#head + 1] = math.ceil(levels[i][1] + held[i][1])
    head[#head + 1] = math.ceil(levels[i][2] + held[i][2])
  end
  return head
end

if redis.call('EXISTS', KEYS[2]) == 1 then
  return reply({0, 1})
end

local unseeded = {3}
for i = 1, n do
  if not seeded[i] then
    unseeded[#unseeded + 1] = i
  end
end
if #unseeded > 1 then
  return unseeded
end

-- A daily refusal that only what leases hold causes lasts until they give their slices back, not
-- until the window resets.
local function daily_wait(i, field, held_total, amount, daily_limit)
  local leased = tonumber(redis.call('HGET', KEYS[5 * i - 2], field)) or 0
  if leased > 0 and held_total - leased + amount <= daily_limit then
    return held_wait
  end
  return 0
end

for i = 1, n do
  local s = states[i]
  local token_limit, cost_limit = limit(i, 1), limit(i, 2)
  if token_limit > 0 and (s[1] + s[2] >= token_limit or s[1] + s[2] + tokens > token_limit) then
    return reply({1, i, 0, daily_wait(i, 'lt', s[1] + s[2], tokens, token_limit)})
  end
  if cost_limit > 0 and (s[3] + s[4] >= cost_limit or s[3] + s[4] + cost > cost_limit) then
    return reply({1, i, 1, daily_wait(i, 'lc', s[3] + s[4], cost, cost_limit)})
  end
  local rpm, tpm = limit(i, 3), limit(i, 4)
  local r, k = levels[i][1], levels[i][2]
  local hr, hk = held[i][1], held[i][2]
  if rpm > 0 and r + hr + 1 > rpm then
    return reply({1, i, 2, wait_ms(r, hr, 1, rpm, held_wait)})
  end
  if tpm > 0 and k + hk + tokens > tpm then
    -- An estimate above the limit never fits: it is refused with a whole window to wait.
    local wait = tokens > tpm and 60000 or wait_ms(k, hk, tokens, tpm, held_wait)
    return reply({1, i, 3, wait})
  end
end

local token_buckets = {}
for i = 1, n do
  local counter, zset = KEYS[5 * i - 2], KEYS[5 * i - 1]
  -- The counter's TTL was set when it was seeded and is renewed by commits.
  redis.call('HINCRBY', counter, 'rt', ARGV[4])
  redis.call('HINCRBY', counter, 'rc', ARGV[5])
  redis.call('ZADD', zset, ARGV[3], ARGV[6])
  redis.call('PEXPIRE', zset, ARGV[8])
  states[i][2] = states[i][2] + tokens
  states[i][4] = states[i][4] + cost
  local rpm, tpm = limit(i, 3), limit(i, 4)
  if rpm > 0 or tpm > 0 then
    local r = rpm > 0 and levels[i][1] + 1 or 0
    local k = tpm > 0 and levels[i][2] + tokens or 0
    bucket_write(KEYS[5 * i], r, k, rpm, tpm, now)
    levels[i] = {r, k}
  end
  if tpm > 0 then
    token_buckets[#token_buckets + 1] = KEYS[5 * i]
  end
end
-- 'b': the token buckets charged the estimate, which settling corrects.
redis.call('HSET', KEYS[2], 'st', 'r', 't', ARGV[4], 'c', ARGV[5], 'm', ARGV[6], 's', ARGV[9],
  'b', table.concat(token_buckets, '\n'))
redis.call('PEXPIRE', KEYS[2], ARGV[7])
return reply({0, 0})
