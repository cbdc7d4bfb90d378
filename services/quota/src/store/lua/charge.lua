-- Charge usage whose reservation the store no longer has (it lost its data since the reserve),
-- directly to the request's counters, once: the settled record written here makes replays of the
-- same commit answer 'exists'.
-- KEYS[1] reservation record, KEYS[2] dirty-usage hash, KEYS[i+2] counter hash i.
-- ARGV[1] tokens, ARGV[2] cost, ARGV[3] record TTL (ms), ARGV[4] counter TTL (ms),
-- ARGV[5] '1' to mark counters dirty, ARGV[6] newline-separated counter key suffixes.
-- Returns {'exists'}, {'seed', i...} for counters never seeded, or {'ok', counters...}.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {'exists'}
end
local unseeded = {'seed'}
for i = 3, #KEYS do
  if redis.call('HEXISTS', KEYS[i], 's') == 0 then
    unseeded[#unseeded + 1] = i - 2
  end
end
if #unseeded > 1 then
  return unseeded
end
local suffixes = split_lines(ARGV[6])
local out = {'ok'}
for i = 3, #KEYS do
  redis.call('HINCRBY', KEYS[i], 'ut', ARGV[1])
  redis.call('HINCRBY', KEYS[i], 'uc', ARGV[2])
  redis.call('HINCRBY', KEYS[i], 'n', 1)
  redis.call('PEXPIRE', KEYS[i], ARGV[4])
  if ARGV[5] == '1' then
    redis.call('HINCRBY', KEYS[2], suffixes[i - 2], 1)
  end
  local v = read(KEYS[i])
  for j = 1, 5 do
    out[#out + 1] = v[j]
  end
end
redis.call('HSET', KEYS[1], 'st', 'c', 't', 0, 'c', 0, 'm', '', 's', ARGV[6])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return out
