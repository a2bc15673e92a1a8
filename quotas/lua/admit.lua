-- One admission decision, atomically: budget, per-key cap, tenant and key CU/minute
-- (GCRA token buckets), the tenant's concurrent-job cap and the pool's weighted semaphore.
-- Nothing is written unless the request is admitted or queued.
--
-- KEYS: 1 budget used (mCU)   2 key used (mCU)     3 tenant TAT   4 key TAT
--       5 tenant in-flight zset (id -> lease expiry ms)
--       6 pool hash (id -> mCU)  7 pool zset (id -> lease expiry ms)  8 pool sum (mCU)
--       9 reservation hash  10 tenant's queued zset (id -> marker expiry ms)
-- ARGV: 1 cost  2 budget limit (-1 none)  3 key cap (-1 none)
--       4 tenant rate (mCU/min)  5 tenant burst (mCU)  6 key rate (-1 none)  7 key burst
--       8 concurrent-job cap  9 pool capacity (mCU)  10 mode "sync"|"async"
--       11 lease ms  12 reservation ttl s  13 reservation id  14 pool name
--       15 pool retry-after hint ms  16 pool job slots (jobs in flight at once)
-- Returns {outcome, retry_after_ms, budget_used, tenant_remaining_mcu, tenant_reset_ms}

--! include quotas/pool

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)

local cost = tonumber(ARGV[1])
local budget_limit = tonumber(ARGV[2])
local key_cap = tonumber(ARGV[3])
local tenant_rate = tonumber(ARGV[4])
local tenant_burst = tonumber(ARGV[5])
local key_rate = tonumber(ARGV[6])
local key_burst = tonumber(ARGV[7])
local conc_limit = tonumber(ARGV[8])
local pool_capacity = tonumber(ARGV[9])
local mode = ARGV[10]
local lease_ms = tonumber(ARGV[11])
local reservation_ttl = tonumber(ARGV[12])
local reservation_id = ARGV[13]

--! include quotas/gcra

-- What the rate-limit headers report: whole mCU left in the bucket, ms until it is full.
local function bucket_state(tat, interval, tolerance)
  local remaining = math.floor((now + tolerance - tat) / interval)
  if remaining < 0 then remaining = 0 end
  return remaining, math.ceil(tat - now)
end

-- Counters missing means Redis lost them: the caller rebuilds them from the ledger.
-- Every counter the decision reads, in one call: budget used, key used, tenant TAT, key TAT,
-- pool sum.
local stored = redis.call('MGET', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[8])
local used, key_used = stored[1], stored[2]
if not used or not key_used then return {'miss', 0, 0, 0, 0} end
used = tonumber(used)
key_used = tonumber(key_used)

local t_ok, t_retry, t_tat, t_new_tat, t_interval, t_tolerance = gcra(stored[3], tenant_rate, tenant_burst, cost, now)
local t_remaining, t_reset = bucket_state(t_tat, t_interval, t_tolerance)

if budget_limit >= 0 and used + cost > budget_limit then
  return {'insufficient_quota', 0, used, t_remaining, t_reset}
end
if key_cap >= 0 and key_used + cost > key_cap then
  return {'key_cap', 0, used, t_remaining, t_reset}
end
if cost > tenant_burst then return {'too_large', 0, used, t_remaining, t_reset} end
if not t_ok then return {'rate_tenant', t_retry, used, t_remaining, t_reset} end

local k_ok, k_new_tat = true, nil
if key_rate > 0 then
  if cost > key_burst then return {'too_large', 0, used, t_remaining, t_reset} end
  local k_retry, k_tat
  k_ok, k_retry, k_tat, k_new_tat = gcra(stored[4], key_rate, key_burst, cost, now)
  if not k_ok then return {'rate_key', k_retry, used, t_remaining, t_reset} end
end

local pool_used = pool_leases_expire(KEYS[5], KEYS[6], KEYS[7], KEYS[8],
                                     tonumber(stored[5] or '0'), now)
local fits_concurrency = slots_free(KEYS[5], conc_limit) > 0
local fits_pool = pool_fits(KEYS[7], pool_used, cost, pool_capacity, tonumber(ARGV[16]))
local admit = fits_concurrency and fits_pool

if not admit and mode ~= 'async' then
  if not fits_concurrency then return {'concurrency', 1000, used, t_remaining, t_reset} end
  return {'pool', tonumber(ARGV[15]), used, t_remaining, t_reset}
end

-- Admitted or queued: reserve the budget and spend the rate tokens.
redis.call('SET', KEYS[3], t_new_tat, 'PX', math.ceil(t_new_tat - now) + 1000)
if k_new_tat then
  redis.call('SET', KEYS[4], k_new_tat, 'PX', math.ceil(k_new_tat - now) + 1000)
end
used = redis.call('INCRBY', KEYS[1], cost)
redis.call('INCRBY', KEYS[2], cost)

local outcome = 'queued'
if admit then
  outcome = 'admitted'
  pool_take(KEYS[5], KEYS[6], KEYS[7], KEYS[8], reservation_id, cost, now + lease_ms)
end
-- The key counter it was counted in: a forced rebuild (rebuild.lua) counts an admission whose
-- row is not committed yet in that key's counter too (the name carries the period).
redis.call('HSET', KEYS[9], 'state', outcome, 'cost', cost, 'pool', ARGV[14], 'key_used', KEYS[2])
redis.call('EXPIRE', KEYS[9], reservation_ttl)
if outcome == 'queued' then
  -- Indexed by tenant as an admitted one is (its in-flight zset): a forced rebuild finds it
  -- there while its job's transaction has not committed it. It leaves on release (settle.lua)
  -- or, never released, when its marker expires (the score; dropped here on the next one).
  redis.call('ZREMRANGEBYSCORE', KEYS[10], '-inf', now)
  redis.call('ZADD', KEYS[10], now + reservation_ttl * 1000, reservation_id)
  redis.call('EXPIRE', KEYS[10], reservation_ttl)
end
t_remaining, t_reset = bucket_state(t_new_tat, t_interval, t_tolerance)
return {outcome, 0, used, t_remaining, t_reset}
