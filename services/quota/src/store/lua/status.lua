-- Counters of several scopes, expired reservations dropped first.
-- KEYS[2i-1] / KEYS[2i] counter hash / reservation zset; ARGV[1] now (ms).
-- Returns five integers per counter.
local out = {}
for i = 1, #KEYS / 2 do
  prune(KEYS[2 * i - 1], KEYS[2 * i], ARGV[1])
  local v = read(KEYS[2 * i - 1])
  for j = 1, 5 do
    out[#out + 1] = v[j]
  end
end
return out
