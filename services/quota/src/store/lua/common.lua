-- Shared by every quota script. Counter hash fields: ut/uc used tokens/cost, rt/rc reserved
-- tokens/cost, n commits. Reservation zset members: "<reservation id>|<tokens>|<cost>", scored by
-- expiry (ms since epoch), so a counter can drop expired reservations without any other key.

-- Lua numbers would be sent as "1e+15"; counters need integer strings.
local function int(x)
  return string.format('%d', x)
end

-- Drops the counter's reservations that expired at or before `now`, releasing what they held.
local function prune(counter, zset, now)
  local expired = redis.call('ZRANGEBYSCORE', zset, '-inf', now)
  if #expired == 0 then
    return
  end
  local tokens, cost = 0, 0
  for _, member in ipairs(expired) do
    local t, c = string.match(member, '|(%d+)|(%d+)$')
    tokens = tokens + tonumber(t)
    cost = cost + tonumber(c)
  end
  redis.call('ZREMRANGEBYSCORE', zset, '-inf', now)
  redis.call('HINCRBY', counter, 'rt', int(-tokens))
  redis.call('HINCRBY', counter, 'rc', int(-cost))
end

-- {used tokens, reserved tokens, used cost, reserved cost, commits}
local function read(counter)
  local v = redis.call('HMGET', counter, 'ut', 'rt', 'uc', 'rc', 'n')
  return {tonumber(v[1]) or 0, tonumber(v[2]) or 0, tonumber(v[3]) or 0, tonumber(v[4]) or 0, tonumber(v[5]) or 0}
end

