-- A pool's exponentially weighted average run time (for queue ETAs), in one round trip.
--
-- KEYS: 1 the pool's average (seconds)
-- ARGV: 1 this job's run time (seconds)  2 how long the average is kept (seconds)
-- Returns the new average.

local value = tonumber(ARGV[1])
local previous = redis.call('GET', KEYS[1])
if previous then value = 0.8 * tonumber(previous) + 0.2 * value end
redis.call('SET', KEYS[1], value, 'EX', ARGV[2])
return tostring(value)
