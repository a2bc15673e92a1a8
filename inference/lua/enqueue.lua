-- Weighted fair queuing on CU: a job's finish tag is where its tenant's virtual time will
-- be once it has run. A tenant that floods the pool pushes only its own tags forward, so a
-- light tenant arriving later lands near the front (start = the pool's virtual time).
--
-- Idempotent, for the reconciliation that re-queues jobs Redis lost (inference/reconcile.py):
-- a job already queued keeps its tag (its tenant's tags do not move twice), and one whose
-- reservation a dispatch round has already taken onto the pool (its marker reads anything but
-- 'queued') is not queued again: it is being started. A missing marker does not refuse: the
-- dispatch round leaves such a job in place until the counters are rebuilt.
--
-- KEYS: 1 queue zset (job id -> finish tag)  2 tenant's last finish tag  3 pool virtual time
--       4 set of priorities in use  5 job hash (job id -> what dispatch.lua needs of it)
--       6 the reservation's marker (quotas' hash of its state)
-- ARGV: 1 job id  2 cost (mCU)  3 weight  4 priority
--       5 "<reservation id> <tenant id> <tenant's concurrent-job cap>"
-- Returns the finish tag, or false when the job is not queued (its reservation was admitted).

local state = redis.call('HGET', KEYS[6], 'state')
if state and state ~= 'queued' then return false end
local queued_tag = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not queued_tag then
  local pool_vtime = tonumber(redis.call('GET', KEYS[3]) or '0')
  local last_finish = tonumber(redis.call('GET', KEYS[2]) or '0')
  local start = math.max(pool_vtime, last_finish)
  local finish = start + tonumber(ARGV[2]) / tonumber(ARGV[3])
  redis.call('SET', KEYS[2], finish, 'EX', 86400)
  redis.call('ZADD', KEYS[1], finish, ARGV[1])
  queued_tag = tostring(finish)
end
redis.call('SADD', KEYS[4], ARGV[4])
redis.call('HSET', KEYS[5], ARGV[1], ARGV[5])
return queued_tag
