-- Move a queued reservation onto the pool: it takes a concurrency slot and pool capacity
-- when both are free. Used by the scheduler when it hands queued work to a worker.
--
-- KEYS: 1 tenant in-flight zset  2 pool hash  3 pool zset  4 pool sum  5 reservation hash
-- ARGV: 1 reservation id  2 concurrent-job cap  3 pool capacity  4 lease ms  5 pool job slots
-- Returns 'admitted'; 'wait_tenant' (the tenant is at its job cap: others may go first);
-- 'wait_pool' (the pool is full: nobody goes); or the reservation's other state ('gone').

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local id = ARGV[1]

local state = redis.call('HGET', KEYS[5], 'state')
if not state then return 'gone' end
if state ~= 'queued' then return state end
local cost = tonumber(redis.call('HGET', KEYS[5], 'cost'))

redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)
for _, other in ipairs(expired) do
  local held = redis.call('HGET', KEYS[2], other)
  if held then
    redis.call('HDEL', KEYS[2], other)
    redis.call('DECRBY', KEYS[4], held)
  end
  redis.call('ZREM', KEYS[3], other)
end

local pool_used = tonumber(redis.call('GET', KEYS[4]) or '0')
if pool_used + cost > tonumber(ARGV[3]) and pool_used > 0 then return 'wait_pool' end
if redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[5]) then return 'wait_pool' end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 'wait_tenant' end

local lease_until = now + tonumber(ARGV[4])
redis.call('ZADD', KEYS[1], lease_until, id)
redis.call('HSET', KEYS[2], id, cost)
redis.call('ZADD', KEYS[3], lease_until, id)
redis.call('INCRBY', KEYS[4], cost)
redis.call('HSET', KEYS[5], 'state', 'admitted')
return 'admitted'
