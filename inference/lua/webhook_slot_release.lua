-- Give back a webhook endpoint's delivery slot (webhook_slot_take.lua) and name who is next:
-- the first members of the line, as many as slots are now free, for the caller to wake (their
-- own retry would come later). Giving back a slot twice, or one whose lease ran out, frees
-- nothing more.
--
-- KEYS: 1 slots zset  2 line zset  3 places zset (webhook_line.lua)
-- ARGV: 1 holder  2 slot limit
-- Returns the line members to wake, first first.

--! include quotas/pool
--! include inference/webhook_line

local now = now_ms()
redis.call('ZREM', KEYS[1], ARGV[1])
slots_expire(KEYS[1], now)
line_expire(KEYS[2], KEYS[3], now)
local free = slots_free(KEYS[1], tonumber(ARGV[2]))
if free <= 0 then return {} end
return redis.call('ZRANGE', KEYS[2], 0, free - 1)
