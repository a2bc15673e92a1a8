-- Restore a tenant's counters for a period from values computed from the ledger.
-- The budget counter and reservation markers are restored only if the budget counter is
-- still missing, so concurrent rebuilds count once; the per-key counters are then set with
-- it, from the same ledger. A missing per-key counter (a new key, or one Redis evicted) is
-- otherwise restored on its own. Markers of active reservations come back so that their
-- settlement refunds.
-- A settlement Redis has not seen yet (Postgres' redis_synced=False, replayed by the sync
-- task) is in the ledger read here: its marker becomes a tombstone (state 'settled') and its
-- slot is freed, so the replay finds it accounted for and changes no counter (settle.lua,
-- adopt.lua), instead of charging or refunding it a second time. So does a recent settlement
-- whose marker is still live (`live_only`: its process died before mirroring it, or is about
-- to; the reconciler's sweep would mirror it): only if the marker is still there.
--
-- KEYS: 1 budget used
-- ARGV: 1 JSON {budget_used, ttl_s, key_counters: {name: mCU},
--              reservations: [{key, state, cost, pool, in_flight_key, pool_hash, pool_zset,
--                              pool_sum, lease_until_ms}],
--              settled: [{key, in_flight_key, pool_hash, pool_zset, pool_sum, live_only}]}
-- Returns 1 if applied, 0 if another rebuild got there first.
-- (Key names inside ARGV: Sluice keeps hot counters on one Redis primary, not a cluster.)

local data = cjson.decode(ARGV[1])
local ttl = tonumber(data.ttl_s)
local applies = redis.call('EXISTS', KEYS[1]) == 0
for name, value in pairs(data.key_counters) do
  if applies then
    redis.call('SET', name, value, 'EX', ttl)
  else
    redis.call('SET', name, value, 'EX', ttl, 'NX')
  end
end
if not applies then return 0 end
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
for _, r in ipairs(data.settled or {}) do
  local state = redis.call('HGET', r.key, 'state')
  if not r.live_only or (state and state ~= 'settled') then
    local id = string.sub(r.key, 5)
    redis.call('ZREM', r.in_flight_key, id)
    local held = redis.call('HGET', r.pool_hash, id)
    if held then
      redis.call('HDEL', r.pool_hash, id)
      redis.call('DECRBY', r.pool_sum, held)
    end
    redis.call('ZREM', r.pool_zset, id)
    redis.call('HSET', r.key, 'state', 'settled')
    redis.call('EXPIRE', r.key, ttl)
  end
end
return 1
