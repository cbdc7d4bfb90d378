-- Reserve an amount against every counter: all admit it or nothing changes.
-- KEYS[1] limits generation, KEYS[2] reservation record,
-- KEYS[2i+1] / KEYS[2i+2] counter hash / reservation zset of counter i (i = 1..n).
-- ARGV[1] expected limits generation ('' = none), ARGV[2] now (ms), ARGV[3] expiry (ms),
-- ARGV[4] tokens, ARGV[5] cost, ARGV[6] zset member, ARGV[7] record TTL (ms),
-- ARGV[8] counter TTL (ms), ARGV[9] newline-separated counter key suffixes (kept for settling),
-- ARGV[2i+8] / ARGV[2i+9] token / cost limit of counter i (0 = unlimited).
-- Returns {2} when limits changed; {0, existing, counters...} when admitted;
-- {1, i, limit (0 tokens, 1 cost), counters...} when counter i refuses. Five integers per counter.
local generation = redis.call('GET', KEYS[1]) or ''
if generation ~= ARGV[1] then
  return {2}
end

local now = ARGV[2]
local n = (#KEYS - 2) / 2
local tokens = tonumber(ARGV[4])
local cost = tonumber(ARGV[5])

local states = {}
for i = 1, n do
  prune(KEYS[2 * i + 1], KEYS[2 * i + 2], now)
  states[i] = read(KEYS[2 * i + 1])
end

local function reply(head)
  for i = 1, n do
    for j = 1, 5 do
      head[#head + 1] = states[i][j]
    end
  end
  return head
end

if redis.call('EXISTS', KEYS[2]) == 1 then
  return reply({0, 1})
end

for i = 1, n do
  local s = states[i]
  local token_limit = tonumber(ARGV[2 * i + 8])
  local cost_limit = tonumber(ARGV[2 * i + 9])
  if token_limit > 0 and (s[1] + s[2] >= token_limit or s[1] + s[2] + tokens > token_limit) then
    return reply({1, i, 0})
  end
  if cost_limit > 0 and (s[3] + s[4] >= cost_limit or s[3] + s[4] + cost > cost_limit) then
    return reply({1, i, 1})
  end
end

for i = 1, n do
  local counter, zset = KEYS[2 * i + 1], KEYS[2 * i + 2]
  redis.call('HINCRBY', counter, 'rt', ARGV[4])
  redis.call('HINCRBY', counter, 'rc', ARGV[5])
  redis.call('ZADD', zset, ARGV[3], ARGV[6])
  redis.call('PEXPIRE', counter, ARGV[8])
  redis.call('PEXPIRE', zset, ARGV[8])
  states[i][2] = states[i][2] + tokens
  states[i][4] = states[i][4] + cost
end
redis.call('HSET', KEYS[2], 'st', 'r', 't', ARGV[4], 'c', ARGV[5], 'm', ARGV[6], 's', ARGV[9])
redis.call('PEXPIRE', KEYS[2], ARGV[7])
return reply({0, 0})
