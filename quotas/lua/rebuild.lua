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
-- Forced (`force`, the rebuild_counters command): the counters exist and are overwritten, in
-- this one step, with the ledger's figures plus what Redis counted that the ledger read did
-- not see: an admission whose row is not committed yet (job_submit commits it after
-- admit.lua ran). Those are found through the tenant's in-flight zset (admitted) and queued
-- zset (queued for pool capacity, admit.lua): a live marker (state admitted or queued)
-- written by admit.lua (`key_used` names the key counter it was counted in, and its period)
-- for this period whose reserve was not in the ledger read (`known`; the locked running
-- reservations were committed before it) adds its cost to the budget counter and to that key
-- counter.
-- The zsets' members were read (`read`) before the ledger: one the ledger read could not have
-- looked for (admitted since), or one whose marker went since (released: its refund went to
-- the counter this overwrites) other than a locked running reservation's, makes the script
-- write nothing and return -1: the caller reads again.
--
-- KEYS: 1 budget used
-- ARGV: 1 JSON {budget_used, ttl_s, key_counters: {name: mCU},
--              reservations: [{key, state, cost, pool, in_flight_key, pool_hash, pool_zset,
--                              pool_sum, lease_until_ms}],
--              settled: [{key, in_flight_key, pool_hash, pool_zset, pool_sum, live_only}],
--              force: {period, in_flight_key, queued_key, marker_prefix, read: [id],
--                      known: [id]}}
-- Returns 1 if applied, 0 if another rebuild got there first, -1 (forced) to read again.
-- (Key names inside ARGV: Sluice keeps hot counters on one Redis primary, not a cluster.)

local data = cjson.decode(ARGV[1])
local ttl = tonumber(data.ttl_s)
local force = data.force
local budget_used = tonumber(data.budget_used)
local key_counters = data.key_counters

if force then
  local read, known, locked = {}, {}, {}
  for _, id in ipairs(force.read) do read[id] = true end
  for _, id in ipairs(force.known) do known[id] = true end
  for _, r in ipairs(data.reservations) do locked[string.sub(r.key, 5)] = true end
  for id in pairs(read) do
    if not locked[id] and redis.call('EXISTS', force.marker_prefix .. id) == 0 then return -1 end
  end
  local suffix = ':' .. force.period
  local open = redis.call('ZRANGE', force.in_flight_key, 0, -1)
  for _, id in ipairs(redis.call('ZRANGE', force.queued_key, 0, -1)) do
    -- One a dispatch round moved onto the pool is in both: counted once.
    if redis.call('HGET', force.marker_prefix .. id, 'state') == 'queued' then
      table.insert(open, id)
    end
  end
  for _, id in ipairs(open) do
    local marker = redis.call('HMGET', force.marker_prefix .. id, 'state', 'cost', 'key_used')
    local state, cost, key_used = marker[1], marker[2], marker[3]
    if (state == 'admitted' or state == 'queued') and key_used and not known[id]
        and not locked[id] and string.sub(key_used, -#suffix) == suffix then
      if not read[id] then return -1 end
      budget_used = budget_used + tonumber(cost)
      key_counters[key_used] = (key_counters[key_used] or 0) + tonumber(cost)
    end
  end
end

local applies = force ~= nil or redis.call('EXISTS', KEYS[1]) == 0
for name, value in pairs(key_counters) do
  if applies then
    redis.call('SET', name, value, 'EX', ttl)
  else
    redis.call('SET', name, value, 'EX', ttl, 'NX')
  end
end
if not applies then return 0 end
redis.call('SET', KEYS[1], budget_used, 'EX', ttl)
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
