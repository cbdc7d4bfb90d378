-- Carve, renew, settle or return a lease: one holder's hold on a slice of every counter, in the
-- same atomicity as a reservation. In order: the old hold is taken out, the usage spent under it
-- is charged, what the holder keeps of it is held again, and a new slice is carved from what is
-- free (at most 1/divisor of it, in every scope) unless even the least slice asked for does not
-- fit, or the lease's daily window is over.
-- KEYS[1] limits generation, KEYS[2] lease record, KEYS[3] dirty-usage hash, and per counter i of
-- the current window (i = 1..n): KEYS[5i-1] counter hash, KEYS[5i] reservation zset, KEYS[5i+1]
-- per-minute bucket, KEYS[5i+2] / KEYS[5i+3] what leases hold of the per-minute limits.
-- ARGV[1] expected limits generation, ARGV[2] now (ms), ARGV[3] expiry (ms), ARGV[4] sequence,
-- ARGV[5] record TTL (ms), ARGV[6] counter TTL (ms), ARGV[7] '1' to mark charged counters dirty,
-- ARGV[8] newline-separated counter key suffixes of the current window, ARGV[9] key prefix,
-- ARGV[10] lease id, ARGV[11..14] spent tokens, cost, started requests, settled requests,
-- ARGV[15..18] keep, ARGV[19..22] want, ARGV[23..26] need (each tokens, cost, minute requests,
-- minute tokens), ARGV[27] slice divisor, ARGV[4i+24] .. ARGV[4i+27] tokens/day, cost/day,
-- requests/minute, tokens/minute limits of counter i (0 = unlimited).
-- Returns {2} when limits changed; {3, i...} when counters i were never seeded from the ledger;
-- else {0, replay, window ended, low counter (0 = none), low limit, held tokens, cost, minute
-- requests, minute tokens, expiry (ms), counters...}, seven integers per counter of the current
-- window: five daily values and the two per-minute levels with what leases hold of them.
-- The lease's own counters come from its record when its window is over, so this script only
-- runs on standalone/Sentinel Redis, like settle.
local now = tonumber(ARGV[2])
local n = (#KEYS - 3) / 5
local prefix = ARGV[9]

local function arg(i)
  return tonumber(ARGV[i])
end

local function limit(i, j)
  return tonumber(ARGV[4 * i + 23 + j])
end

local function reply(head)
  for i = 1, n do
    local v = read(KEYS[5 * i - 1])
    for j = 1, 5 do
      head[#head + 1] = v[j]
    end
    local r, k = bucket_read(KEYS[5 * i + 1], now)
    local hr, hk = holds_read(KEYS[5 * i + 2])
    head[#head + 1] = math.ceil(r + hr)
    head[#head + 1] = math.ceil(k + hk)
  end
  return head
end

local rec = redis.call('HMGET', KEYS[2], 'q', 's', 'ht', 'hc', 'hr', 'hk', 'e', 'm', 'mm')
local exists = rec[1] ~= false
local window = exists and rec[2] or ARGV[8]
local same_window = window == ARGV[8]

if exists and tonumber(rec[1]) >= arg(4) then
  local e = tonumber(rec[7])
  if e > now then
    return reply({0, 1, same_window and 0 or 1, 0, 0, tonumber(rec[3]), tonumber(rec[4]), tonumber(rec[5]),
      tonumber(rec[6]), e})
  end
  return reply({0, 1, same_window and 0 or 1, 0, 0, 0, 0, 0, 0, e})
end

if (redis.call('GET', KEYS[1]) or '') ~= ARGV[1] then
  return {2}
end

if same_window then
  local unseeded = {3}
  for i = 1, n do
    if redis.call('HEXISTS', KEYS[5 * i - 1], 's') == 0 then
      unseeded[#unseeded + 1] = i
    end
  end
  if #unseeded > 1 then
    return unseeded
  end
end

-- The lease's daily counters: the current window's, or its own past one.
local suffixes = split_lines(window)
if #suffixes ~= n then
  return redis.error_reply('lease ' .. ARGV[10] .. ' names other scopes than its principal')
end
local function daily(i)
  if same_window then
    return KEYS[5 * i - 1], KEYS[5 * i]
  end
  return prefix .. 'c:' .. suffixes[i], prefix .. 'z:' .. suffixes[i]
end

for i = 1, n do
  prune(KEYS[5 * i - 1], KEYS[5 * i], ARGV[2])
  holds_prune(KEYS[5 * i + 2], KEYS[5 * i + 3], ARGV[2])
end

-- Take the old hold out; only whoever removes a member releases it (an expired, pruned one holds
-- nothing any more), and nothing is kept of a lease that expired.
local old = {0, 0, 0, 0}
if exists then
  local ht, hc, hr, hk = tonumber(rec[3]), tonumber(rec[4]), tonumber(rec[5]), tonumber(rec[6])
  for i = 1, n do
    local counter, zset = daily(i)
    if redis.call('ZREM', zset, rec[8]) == 1 then
      redis.call('HINCRBY', counter, 'rt', int(-ht))
      redis.call('HINCRBY', counter, 'rc', int(-hc))
      redis.call('HINCRBY', counter, 'lt', int(-ht))
      redis.call('HINCRBY', counter, 'lc', int(-hc))
    end
    if redis.call('ZREM', KEYS[5 * i + 3], rec[9]) == 1 then
      redis.call('HINCRBY', KEYS[5 * i + 2], 'r', int(-hr))
      redis.call('HINCRBY', KEYS[5 * i + 2], 'k', int(-hk))
    end
  end
  if tonumber(rec[7]) > now then
    old = {ht, hc, hr, hk}
  end
end

-- Charge what was spent: to the lease's window, and to the per-minute buckets now.
local spent_tokens, spent_cost, started, settled = arg(11), arg(12), arg(13), arg(14)
for i = 1, n do
  if spent_tokens ~= 0 or spent_cost ~= 0 or settled ~= 0 then
    local counter = daily(i)
    redis.call('HINCRBY', counter, 'ut', ARGV[11])
    redis.call('HINCRBY', counter, 'uc', ARGV[12])
    redis.call('HINCRBY', counter, 'n', ARGV[14])
    redis.call('PEXPIRE', counter, ARGV[6])
    if ARGV[7] == '1' then
      redis.call('HINCRBY', KEYS[3], suffixes[i], 1)
    end
  end
  local rpm, tpm = limit(i, 3), limit(i, 4)
  if (rpm > 0 or tpm > 0) and (started ~= 0 or spent_tokens ~= 0) then
    local r, k = bucket_read(KEYS[5 * i + 1], now)
    bucket_write(KEYS[5 * i + 1], rpm > 0 and r + started or 0, tpm > 0 and k + spent_tokens or 0, rpm, tpm, now)
  end
end

-- A limit no scope sets is not held: the holder admits without counting it.
local limited = {false, false, false, false}
for i = 1, n do
  for j = 1, 4 do
    if limit(i, j) > 0 then
      limited[j] = true
    end
  end
end
local keep = {}
for j = 1, 4 do
  keep[j] = limited[j] and math.min(arg(14 + j), old[j]) or 0
end

-- What scope i could spare in limit j beside what is kept.
local function free(i, j)
  local lim = limit(i, j)
  if j <= 2 then
    local v = read(KEYS[5 * i - 1])
    local used = j == 1 and v[1] + v[2] or v[3] + v[4]
    return lim - used - keep[j]
  end
  local r, k = bucket_read(KEYS[5 * i + 1], now)
  local hr, hk = holds_read(KEYS[5 * i + 2])
  return lim - (j == 3 and r + hr or k + hk) - keep[j]
end

local grant = {0, 0, 0, 0}
local low_counter, low_limit = 0, 0
if same_window then
  local divisor = arg(27)
  for j = 1, 4 do
    if limited[j] then
      local g = arg(18 + j)
      for i = 1, n do
        if limit(i, j) > 0 then
          local spare = math.floor(math.max(0, free(i, j)) / divisor)
          if spare < arg(22 + j) and low_counter == 0 then
            low_counter, low_limit = i, j - 1
          end
          g = math.min(g, spare)
        end
      end
      grant[j] = g
    end
  end
  if low_counter > 0 then
    grant = {0, 0, 0, 0}
  end
end

-- Keys shared with other leases only ever get a longer life: their holds must not vanish with them.
local function outlive(key, ms)
  -- PTTL is -1 for a key without a lifetime yet.
  if redis.call('PTTL', key) < ms then
    redis.call('PEXPIRE', key, ms)
  end
end

local hold = {}
for j = 1, 4 do
  hold[j] = keep[j] + grant[j]
end
local member, minute_member = '', ''
if hold[1] > 0 or hold[2] > 0 then
  member = ARGV[10] .. '|' .. int(hold[1]) .. '|' .. int(hold[2])
end
if hold[3] > 0 or hold[4] > 0 then
  minute_member = ARGV[10] .. '|' .. int(hold[3]) .. '|' .. int(hold[4])
end
for i = 1, n do
  if member ~= '' then
    local counter, zset = daily(i)
    redis.call('HINCRBY', counter, 'rt', int(hold[1]))
    redis.call('HINCRBY', counter, 'rc', int(hold[2]))
    redis.call('HINCRBY', counter, 'lt', int(hold[1]))
    redis.call('HINCRBY', counter, 'lc', int(hold[2]))
    redis.call('ZADD', zset, ARGV[3], member)
    redis.call('PEXPIRE', zset, ARGV[6])
  end
  if minute_member ~= '' then
    local lifetime = math.max(0, arg(3) - now) + 60000
    redis.call('HINCRBY', KEYS[5 * i + 2], 'r', int(hold[3]))
    redis.call('HINCRBY', KEYS[5 * i + 2], 'k', int(hold[4]))
    redis.call('ZADD', KEYS[5 * i + 3], ARGV[3], minute_member)
    outlive(KEYS[5 * i + 2], lifetime)
    outlive(KEYS[5 * i + 3], lifetime)
  end
end
redis.call('HSET', KEYS[2], 'st', 'l', 'q', ARGV[4], 's', window, 'ht', int(hold[1]), 'hc', int(hold[2]),
  'hr', int(hold[3]), 'hk', int(hold[4]), 'e', ARGV[3], 'm', member, 'mm', minute_member)
redis.call('PEXPIRE', KEYS[2], ARGV[5])
return reply({0, 0, same_window and 0 or 1, low_counter, low_limit, hold[1], hold[2], hold[3], hold[4], arg(3)})
