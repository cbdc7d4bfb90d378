-- Acknowledge ledger writes: drop a dirty entry only if its version is still the one written.
-- KEYS[1] dirty-usage hash; ARGV: field, version, field, version, ...
for i = 1, #ARGV, 2 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    redis.call('HDEL', KEYS[1], ARGV[i])
  end
end
return 0
