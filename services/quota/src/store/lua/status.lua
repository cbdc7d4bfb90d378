-- Counters of several scopes, expired reservations and leases dropped first.
-- Per counter i: KEYS[5i-4] counter hash, KEYS[5i-3] reservation zset, KEYS[5i-2] per-minute
-- bucket, KEYS[5i-1] / KEYS[5i] what leases hold of the per-minute limits (hash / zset);
-- ARGV[1] now (ms). Returns twelve integers per counter: five daily values, 1 if the counter was
-- seeded from the ledger (else 0), the two per-minute levels with what leases hold of them, the
-- leased tokens and cost (part of the reserved ones), and the leased requests and tokens of the
-- per-minute limits.
local now = tonumber(ARGV[1])
local out = {}
for i = 1, #KEYS / 5 do
  local counter, hold_hash = KEYS[5 * i - 4], KEYS[5 * i - 1]
  prune(counter, KEYS[5 * i - 3], ARGV[1])
  holds_prune(hold_hash, KEYS[5 * i], ARGV[1])
  local v = read(counter)
  for j = 1, 5 do
    out[#out + 1] = v[j]
  end
  out[#out + 1] = redis.call('HEXISTS', counter, 's')
  local r, k = bucket_read(KEYS[5 * i - 2], now)
  local hr, hk = holds_read(hold_hash)
  out[#out + 1] = math.ceil(r + hr)
  out[#out + 1] = math.ceil(k + hk)
  local leased = redis.call('HMGET', counter, 'lt', 'lc')
  out[#out + 1] = tonumber(leased[1]) or 0
  out[#out + 1] = tonumber(leased[2]) or 0
  out[#out + 1] = hr
  out[#out + 1] = hk
end
return out
