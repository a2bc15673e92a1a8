-- Take `cost` units from one GCRA bucket (KEYS[1], its TAT) refilled at ARGV[2] units per
-- minute with room for ARGV[3]; nothing is written when refused.
-- ARGV: 1 cost  2 rate per minute  3 burst
-- Returns {allowed 1|0, retry_after_ms}

--! include quotas/gcra

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local rate = tonumber(ARGV[2])
local allowed, retry_ms, _, new_tat = gcra(redis.call('GET', KEYS[1]), rate, tonumber(ARGV[3]),
                                           tonumber(ARGV[1]), now)
if not allowed then return {0, retry_ms} end
-- Kept until the bucket would be full again: a key that stays is a tenant still limited.
redis.call('SET', KEYS[1], new_tat, 'PX', math.max(1, math.ceil(new_tat - now)))
return {1, 0}
