-- The pool semaphore's "take a slot" step, as a function for the scripts that include it
-- (inference/lua/dispatch.lua, the scheduler's round).
--
-- Moves a queued reservation onto the pool: it takes a concurrency slot of its tenant and
-- pool capacity when both are free. Leases that ran out belong to dead workers and are
-- dropped first. Returns 'admitted'; 'wait_tenant' (the tenant is at its job cap: others may
-- go first); 'wait_pool' (the pool is full: nobody goes); 'gone' (no such reservation in
-- Redis); or the reservation's state when it is not queued (already 'admitted').
local function pool_acquire(in_flight_key, pool_hash, pool_zset, pool_sum, marker, id,
                            job_cap, capacity, lease_ms, slots, now)
  local state = redis.call('HGET', marker, 'state')
  if not state then return 'gone' end
  if state ~= 'queued' then return state end
  local cost = tonumber(redis.call('HGET', marker, 'cost'))

  redis.call('ZREMRANGEBYSCORE', in_flight_key, '-inf', now)
  local expired = redis.call('ZRANGEBYSCORE', pool_zset, '-inf', now)
  for _, other in ipairs(expired) do
    local held = redis.call('HGET', pool_hash, other)
    if held then
      redis.call('HDEL', pool_hash, other)
      redis.call('DECRBY', pool_sum, held)
    end
    redis.call('ZREM', pool_zset, other)
  end

  local pool_used = tonumber(redis.call('GET', pool_sum) or '0')
  if pool_used + cost > capacity and pool_used > 0 then return 'wait_pool' end
  if redis.call('ZCARD', pool_zset) >= slots then return 'wait_pool' end
  if redis.call('ZCARD', in_flight_key) >= job_cap then return 'wait_tenant' end

  local lease_until = now + lease_ms
  redis.call('ZADD', in_flight_key, lease_until, id)
  redis.call('HSET', pool_hash, id, cost)
  redis.call('ZADD', pool_zset, lease_until, id)
  redis.call('INCRBY', pool_sum, cost)
  redis.call('HSET', marker, 'state', 'admitted')
  return 'admitted'
end
