-- A pool's pace, for queue ETAs, in one round trip: exponentially weighted averages of its
-- jobs' run time and of their estimated cost, side by side in one hash. Their ratio is the
-- pool's throughput per job slot in estimated mCU per second, which prices any job by its
-- size: a mean run time alone (a few small jobs) said a queue behind a big video was seconds
-- long. A ratio of averages rather than an average of ratios: a tiny job, its run time mostly
-- start-up, does not count as much as a big one.
--
-- KEYS: 1 the pool's pace hash (fields `seconds`, `mcu`)
-- ARGV: 1 this job's run time (seconds)  2 its estimated cost (mCU)  3 how long the pace is
--       kept (seconds)
-- Returns the new throughput (mCU per second), as a string.

local seconds, mcu = tonumber(ARGV[1]), tonumber(ARGV[2])
local previous = redis.call('HMGET', KEYS[1], 'seconds', 'mcu')
if previous[1] and previous[2] then
  seconds = 0.8 * tonumber(previous[1]) + 0.2 * seconds
  mcu = 0.8 * tonumber(previous[2]) + 0.2 * mcu
end
redis.call('HSET', KEYS[1], 'seconds', seconds, 'mcu', mcu)
redis.call('EXPIRE', KEYS[1], ARGV[3])
return tostring(mcu / seconds)
