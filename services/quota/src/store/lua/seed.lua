-- Rebuild counters from the usage ledger after the store lost them (or on their first use).
-- KEYS[i] counter hash; ARGV[1] counter TTL (ms), ARGV[3i-1..3i+1] tokens, cost, requests of
-- counter i from the ledger. A counter already seeded is left alone, so concurrent seeders agree.
for i = 1, #KEYS do
  if redis.call('HEXISTS', KEYS[i], 's') == 0 then
    redis.call('HINCRBY', KEYS[i], 'ut', ARGV[3 * i - 1])
    redis.call('HINCRBY', KEYS[i], 'uc', ARGV[3 * i])
    redis.call('HINCRBY', KEYS[i], 'n', ARGV[3 * i + 1])
    redis.call('HSET', KEYS[i], 's', 1)
    redis.call('PEXPIRE', KEYS[i], ARGV[1])
  end
end
return 0
