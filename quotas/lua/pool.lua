-- The pool semaphore's steps, as functions for the scripts that include them: admit.lua
-- (new work) and pool_acquire.lua (queued work moving onto the pool).
-- Keys: the tenant's in-flight zset (id -> lease expiry ms), the pool hash (id -> mCU), the
-- pool zset (id -> lease expiry ms) and the pool sum (mCU).

-- A counting semaphore of leases: a zset of holder -> lease expiry (ms). The tenant's
-- concurrent-job cap is one (below); a webhook endpoint's deliveries in flight are another
-- (inference/lua/webhook_slot_take.lua). A lease that ran out belongs to a dead worker.
local function slots_expire(slots_key, now)
  redis.call('ZREMRANGEBYSCORE', slots_key, '-inf', now)
end

-- Slots left under `limit` (0 or less: none; a lowered limit can leave more holders than it).
local function slots_free(slots_key, limit)
  return limit - redis.call('ZCARD', slots_key)
end

local function slot_take(slots_key, holder, lease_until)
  redis.call('ZADD', slots_key, lease_until, holder)
end

-- Leases that ran out belong to dead workers: they no longer hold a concurrency slot, pool
-- capacity or a job slot. `pool_used`: the pool sum as read; returns it after the expiries.
local function pool_leases_expire(in_flight_key, pool_hash, pool_zset, pool_sum, pool_used, now)
  slots_expire(in_flight_key, now)
  local expired = redis.call('ZRANGEBYSCORE', pool_zset, '-inf', now)
  for _, id in ipairs(expired) do
    local held = redis.call('HGET', pool_hash, id)
    if held then
      redis.call('HDEL', pool_hash, id)
      pool_used = redis.call('DECRBY', pool_sum, held)
    end
    redis.call('ZREM', pool_zset, id)
  end
  return pool_used
end

-- Whether `cost` more fits: within the pool's capacity (a job larger than the whole pool may
-- still run alone) and a job slot free.
local function pool_fits(pool_zset, pool_used, cost, capacity, slots)
  return (pool_used + cost <= capacity or pool_used == 0)
    and redis.call('ZCARD', pool_zset) < slots
end

-- Take the slot: the tenant's concurrency, the pool's capacity and a job slot, until the lease.
local function pool_take(in_flight_key, pool_hash, pool_zset, pool_sum, id, cost, lease_until)
  slot_take(in_flight_key, id, lease_until)
  redis.call('HSET', pool_hash, id, cost)
  redis.call('ZADD', pool_zset, lease_until, id)
  redis.call('INCRBY', pool_sum, cost)
end
