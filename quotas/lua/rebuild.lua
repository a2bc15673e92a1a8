-- Restore a tenant's counters for a period from values computed from the ledger.
-- The budget counter and reservation markers are restored only if the budget counter is
-- still missing, so concurrent rebuilds count once; a missing per-key counter (a new key,
-- or one Redis evicted) is restored on its own. Markers of active reservations come back
-- so that their settlement refunds.
--
-- KEYS: 1 budget used
-- ARGV: 1 JSON {budget_used, ttl_s, key_counters: {name: mCU},
--              reservations: [{key, state, cost, pool, in_flight_key, pool_hash, pool_zset,
--                              pool_sum, lease_until_ms}]}
-- Returns 1 if applied, 0 if another rebuild got there first.
-- (Key names inside ARGV: Sluice keeps hot counters on one Redis primary, not a cluster.)

local data = cjson.decode(ARGV[1])
local ttl = tonumber(data.ttl_s)
for name, value in pairs(data.key_counters) do
  redis.call('SET', name, value, 'EX', ttl, 'NX')
end
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('SET', KEYS[1], data.budget_used, 'EX', ttl)
for _, r in ipairs(data.reservations) do
  if redis.call('EXISTS', r.key) == 0 then
    redis.call('HSET', r.key, 'state', r.state, 'cost', r.cost, 'pool', r.pool)
    redis.call('EXPIRE', r.key, ttl)
    if r.state == 'admitted' then
      local id = string.sub(r.key, 5)
      redis.call('ZADD', r.in_flight_key, r.lease_until_ms, id)
      if redis.call('HSETNX', r.pool_hash, id, r.cost) == 1 then
        redis.call('INCRBY', r.pool_sum, r.cost)
        redis.call('ZADD', r.pool_zset, r.lease_until_ms, id)
      end
    end
  end
end
return 1
