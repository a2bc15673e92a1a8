-- Take one of a webhook endpoint's delivery slots (quotas' lease semaphore, quotas/lua/pool.lua),
-- first come first served: a delivery goes only while fewer deliveries older than it wait in
-- the endpoint's line than slots are free, so one that found the endpoint busy is never
-- overtaken by a newer one that happened to come while a slot was free.
--
-- KEYS: 1 slots zset (holder -> lease expiry ms)  2 line zset  3 places zset (member -> when
--       it loses its place, ms): see webhook_line.lua
-- ARGV: 1 holder (unique per take)  2 line member "<delivery id>:<attempt>"  3 slot limit
--       4 lease ms  5 place kept ms
-- Returns 0 when the slot is taken (and the member left the line); otherwise the member's
-- place in line (1: next), where it now waits.

--! include quotas/pool
--! include inference/webhook_line

local now = now_ms()
local holder, member = ARGV[1], ARGV[2]
local limit, lease_ms, keep_ms = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])

slots_expire(KEYS[1], now)
line_expire(KEYS[2], KEYS[3], now)
local ahead = redis.call('ZLEXCOUNT', KEYS[2], '-', '(' .. member)
if slots_free(KEYS[1], limit) > ahead then
  slot_take(KEYS[1], holder, now + lease_ms)
  -- Every lease is as long, so the newest one outlives the rest: an endpoint no one delivers
  -- to leaves no key behind.
  redis.call('PEXPIRE', KEYS[1], lease_ms)
  redis.call('ZREM', KEYS[2], member)
  redis.call('ZREM', KEYS[3], member)
  return 0
end
redis.call('ZADD', KEYS[2], 0, member)
redis.call('ZADD', KEYS[3], now + keep_ms, member)
redis.call('PEXPIRE', KEYS[2], keep_ms)
redis.call('PEXPIRE', KEYS[3], keep_ms)
return ahead + 1
