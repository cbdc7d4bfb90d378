-- Counters of several scopes, expired reservations dropped first.
-- KEYS[3i-2] / KEYS[3i-1] / KEYS[3i] counter hash / reservation zset / per-minute bucket;
-- ARGV[1] now (ms). Returns eight integers per counter: five daily values, 1 if the counter was
-- seeded from the ledger (else 0), and the two bucket levels.
local now = tonumber(ARGV[1])
local out = {}
for i = 1, #KEYS / 3 do
  prune(KEYS[3 * i - 2], KEYS[3 * i - 1], ARGV[1])
  local v = read(KEYS[3 * i - 2])
  for j = 1, 5 do
    out[#out + 1] = v[j]
  end
  out[#out + 1] = redis.call('HEXISTS', KEYS[3 * i - 2], 's')
  local r, k = bucket_read(KEYS[3 * i], now)
  out[#out + 1] = math.ceil(r)
  out[#out + 1] = math.ceil(k)
end
return out
