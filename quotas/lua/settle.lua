-- Release a reservation: refund the unused part of the budget and free its pool capacity
-- and concurrency slot. Idempotent: the reservation hash is the "not yet released" marker.
-- A counter that is missing (Redis lost it) is left missing: it is rebuilt from the ledger,
-- which already holds this settlement, so decrementing a fresh key would give budget away.
-- A marker a rebuild left as a tombstone (state 'settled', rebuild.lua) is only removed: the
-- rebuilt counters hold this settlement already.
--
-- KEYS: 1 reservation hash  2 budget used  3 key used  4 tenant in-flight zset
--       5 pool hash  6 pool zset  7 pool sum  8 tenant's queued zset (admit.lua)
-- ARGV: 1 reservation id  2 refund mCU
-- Returns 1 when released now, 0 when it had been released (or accounted for) already.

local state = redis.call('HGET', KEYS[1], 'state')
local released = redis.call('DEL', KEYS[1]) == 1
-- Its marker gone, a tombstone's too, the tenant's queued index must not name it: a forced
-- rebuild takes a named reservation without a marker for one released under it (rebuild.lua).
redis.call('ZREM', KEYS[8], ARGV[1])
if not released or state == 'settled' then return 0 end
local refund = tonumber(ARGV[2])
if refund > 0 then
  if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('DECRBY', KEYS[2], refund) end
  if redis.call('EXISTS', KEYS[3]) == 1 then redis.call('DECRBY', KEYS[3], refund) end
end
local id = ARGV[1]
redis.call('ZREM', KEYS[4], id)
local held = redis.call('HGET', KEYS[5], id)
if held then
  redis.call('HDEL', KEYS[5], id)
  redis.call('DECRBY', KEYS[7], held)
end
redis.call('ZREM', KEYS[6], id)
return 1
