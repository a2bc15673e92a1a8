-- One dispatch round of a pool, atomically: take queued jobs in order (tier priority, then
-- finish tag) while the pool has room, each through quotas' pool semaphore. Being one
-- script, two dispatchers can never start the same job and need no lock, and a round costs
-- one round trip however many candidates it looks at (no database read per candidate).
--
-- KEYS: 1 set of priorities in use  2 job hash (job id -> "<reservation id> <tenant id>
--       <tenant's concurrent-job cap>", written by enqueue.lua)  3 pool virtual time
--       4 pool hash  5 pool zset  6 pool sum  7 unsent hash (job id -> reservation id: jobs an
--       earlier round took onto the pool whose Celery message could not be sent)
-- ARGV: 1 queue key prefix (priority appended)  2 tenant in-flight key prefix (tenant id
--       appended)  3 reservation hash prefix (reservation id appended)  4 pool capacity (mCU)
--       5 lease ms  6 pool job slots  7 candidates looked at per priority
-- Returns the started jobs as a flat list: job id, reservation id, job id, reservation id...
-- (the unsent ones first: they go out again).
--
-- Per-tenant and per-reservation keys are built here from their prefixes rather than passed
-- in KEYS: which ones a round touches is only known inside it. Fine on one Redis (Sluice's
-- deployment); a Redis Cluster would need the pool's keys in one hash slot.

--! include quotas/pool_acquire

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local capacity, lease_ms, slots = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local per_round = tonumber(ARGV[7])

local priorities = redis.call('SMEMBERS', KEYS[1])
table.sort(priorities, function(a, b) return tonumber(a) > tonumber(b) end)
local vtime = tonumber(redis.call('GET', KEYS[3]) or '0')
local vtime_moved = false
-- Jobs an earlier round took onto the pool but could not send (the broker refused): they hold
-- their slot already, so they are handed out again first, whatever room is left.
local started = redis.call('HGETALL', KEYS[7])
if #started > 0 then redis.call('DEL', KEYS[7]) end

local function finish()
  if vtime_moved then redis.call('SET', KEYS[3], vtime) end
  return started
end

for _, priority in ipairs(priorities) do
  local queue = ARGV[1] .. priority
  local candidates = redis.call('ZRANGE', queue, 0, per_round - 1, 'WITHSCORES')
  for i = 1, #candidates, 2 do
    local job_id, tag = candidates[i], tonumber(candidates[i + 1])
    local entry = redis.call('HGET', KEYS[2], job_id)
    if entry then
      local reservation_id, tenant_id, job_cap = string.match(entry, '^(%S+) (%S+) (%S+)$')
      local outcome = pool_acquire(ARGV[2] .. tenant_id, KEYS[4], KEYS[5], KEYS[6],
                                   ARGV[3] .. reservation_id, reservation_id, tonumber(job_cap),
                                   capacity, lease_ms, slots, now)
      if outcome == 'admitted' then
        redis.call('ZREM', queue, job_id)
        redis.call('HDEL', KEYS[2], job_id)
        if tag > vtime then vtime, vtime_moved = tag, true end
        table.insert(started, job_id)
        table.insert(started, reservation_id)
      elseif outcome == 'wait_pool' then
        return finish()  -- full: lower tags and priorities wait too
      end
      -- 'wait_tenant': its tenant is at its cap, the next tenant may go. 'gone': Redis lost
      -- the reservation; it stays in place until the counters are rebuilt from the ledger.
    end
  end
end
return finish()
