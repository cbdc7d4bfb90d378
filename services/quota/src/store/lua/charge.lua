-- Charge usage the store has no reservation for (it lost its data since the reserve, or the usage
-- was made without one: the Charge RPC) directly to the counters, once: the settled record
-- written here makes replays under the same id answer 'exists'.
-- KEYS[1] reservation or charge record, KEYS[2] dirty-usage hash, KEYS[i+2] counter hash i.
-- ARGV[1] tokens, ARGV[2] cost, ARGV[3] requests, ARGV[4] record TTL (ms), ARGV[5] counter TTL (ms),
-- ARGV[6] '1' to mark counters dirty, ARGV[7] newline-separated counter key suffixes.
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
local suffixes = split_lines(ARGV[7])
local out = {'ok'}
for i = 3, #KEYS do
  redis.call('HINCRBY', KEYS[i], 'ut', ARGV[1])
  redis.call('HINCRBY', KEYS[i], 'uc', ARGV[2])
  redis.call('HINCRBY', KEYS[i], 'n', ARGV[3])
  redis.call('PEXPIRE', KEYS[i], ARGV[5])
  if ARGV[6] == '1' then
    redis.call('HINCRBY', KEYS[2], suffixes[i - 2], 1)
  end
  local v = read(KEYS[i])
  for j = 1, 5 do
    out[#out + 1] = v[j]
  end
end
redis.call('HSET', KEYS[1], 'st', 'c', 't', 0, 'c', 0, 'm', '', 's', ARGV[7])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return out
