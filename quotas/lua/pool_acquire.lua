-- The pool semaphore's "take a slot" step, as a function for the scripts that include it
-- (inference/lua/dispatch.lua, the scheduler's round).
--
-- Moves a queued reservation onto the pool: it takes a concurrency slot of its tenant and
-- pool capacity when both are free. Leases that ran out belong to dead workers and are
-- dropped first. Returns 'admitted'; 'wait_tenant' (the tenant is at its job cap: others may
-- go first); 'wait_pool' (the pool is full: nobody goes); 'gone' (no such reservation in
-- Redis); or the reservation's state when it is not queued (already 'admitted').
-- Its steps are quotas/lua/pool.lua's, which admit.lua takes new work through.

--! include quotas/pool

local function pool_acquire(in_flight_key, pool_hash, pool_zset, pool_sum, marker, id,
                            job_cap, capacity, lease_ms, slots, now)
  local state = redis.call('HGET', marker, 'state')
  if not state then return 'gone' end
  if state ~= 'queued' then return state end
  local cost = tonumber(redis.call('HGET', marker, 'cost'))

  local pool_used = pool_leases_expire(in_flight_key, pool_hash, pool_zset, pool_sum,
                                       tonumber(redis.call('GET', pool_sum) or '0'), now)
  if not pool_fits(pool_zset, pool_used, cost, capacity, slots) then return 'wait_pool' end
  if slots_free(in_flight_key, job_cap) <= 0 then return 'wait_tenant' end

  pool_take(in_flight_key, pool_hash, pool_zset, pool_sum, id, cost, now + lease_ms)
  redis.call('HSET', marker, 'state', 'admitted')
  return 'admitted'
end
