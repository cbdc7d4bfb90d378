-- Commit ('c': charge the actual usage) or release ('x') a reservation, once.
-- KEYS[1] reservation record, KEYS[2] dirty-usage hash.
-- ARGV[1] key prefix, ARGV[2] mode, ARGV[3] tokens, ARGV[4] cost, ARGV[5] settled record TTL (ms),
-- ARGV[6] counter TTL (ms), ARGV[7] '1' to mark charged counters dirty for the ledger, ARGV[8] now (ms).
-- Returns {'missing'}, {'conflict', state}, or {'ok' | 'replay', suffixes, counters...}.
-- The counter keys come from the record, so this script only runs on standalone/Sentinel Redis.
local rec = redis.call('HMGET', KEYS[1], 'st', 't', 'c', 'm', 's', 'b')
local state = rec[1]
if not state then
  return {'missing'}
end

local mode = ARGV[2]
local prefix = ARGV[1]
local now = tonumber(ARGV[8])
local suffixes = split_lines(rec[5])

local function reply(status)
  local out = {status, rec[5]}
  for _, s in ipairs(suffixes) do
    local v = read(prefix .. 'c:' .. s)
    for j = 1, 5 do
      out[#out + 1] = v[j]
    end
  end
  return out
end

if state == mode then
  return reply('replay')
end
if state ~= 'r' then
  return {'conflict', state}
end

local estimate = tonumber(rec[2])
-- Tokens-per-minute buckets were charged the estimate: correct them to the actual tokens (none
-- for a release).
local correction = (mode == 'c' and tonumber(ARGV[3]) or 0) - estimate
for _, s in ipairs(suffixes) do
  local counter, zset = prefix .. 'c:' .. s, prefix .. 'z:' .. s
  -- Only whoever removes the member releases its hold; an expired, pruned one holds nothing.
  if redis.call('ZREM', zset, rec[4]) == 1 then
    redis.call('HINCRBY', counter, 'rt', int(-estimate))
    redis.call('HINCRBY', counter, 'rc', int(-tonumber(rec[3])))
  end
  if mode == 'c' then
    redis.call('HINCRBY', counter, 'ut', ARGV[3])
    redis.call('HINCRBY', counter, 'uc', ARGV[4])
    redis.call('HINCRBY', counter, 'n', 1)
    redis.call('PEXPIRE', counter, ARGV[6])
    if ARGV[7] == '1' then
      redis.call('HINCRBY', KEYS[2], s, 1)
    end
  end
end
if correction ~= 0 then
  for _, bucket in ipairs(split_lines(rec[6] or '')) do
    local r, k, rl, kl = bucket_read(bucket, now)
    if kl > 0 then
      bucket_write(bucket, r, math.max(0, k + correction), rl, kl, now)
    end
  end
end
redis.call('HSET', KEYS[1], 'st', mode)
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return reply('ok')
