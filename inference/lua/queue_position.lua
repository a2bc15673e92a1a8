-- Where a queued job stands, for its ETA, in one round trip: the jobs ahead of it (all those of
-- higher priorities, then those before it in its own), the estimated mCU of theirs and of its
-- own (their reservations' costs, which dispatch.lua reads too), the mCU of the reservations
-- running on the pool (a lease that ran out is a dead worker's: left out), and the pool's pace.
--
-- KEYS: 1 set of priorities in use  2 job hash (job id -> "<reservation id> <tenant id> <cap>")
--       3 pool hash (reservation id -> mCU)  4 pool zset (reservation id -> lease expiry ms)
--       5 the pool's pace hash (run_time.lua's)
-- ARGV: 1 queue key prefix (priority appended)  2 reservation hash prefix (reservation id
--       appended)  3 job id  4 its priority  5 most jobs ahead whose cost is read: a longer
--       queue counts the rest at the mean of those read (the script stays short however deep
--       the queue)
-- Returns false when the job is not queued, else {jobs ahead, their mCU, its own mCU, pace
-- seconds, pace mCU, reservation id, mCU, reservation id, mCU... (those running)}; the pace
-- fields are false while the pool has none.

local own_queue = ARGV[1] .. ARGV[4]
local rank = redis.call('ZRANK', own_queue, ARGV[3])
if not rank then return false end
local priority, most_read = tonumber(ARGV[4]), tonumber(ARGV[5])

-- A queued job's cost, or nil when Redis lost its entry or reservation (counted at the mean).
local function cost_of(job_id)
  local entry = redis.call('HGET', KEYS[2], job_id)
  if not entry then return nil end
  return tonumber(redis.call('HGET', ARGV[2] .. string.match(entry, '^(%S+)'), 'cost'))
end

local ahead, read, read_mcu = rank, 0, 0
local function read_costs(queue, last)
  last = math.min(last, most_read - read - 1)
  if last < 0 then return end
  for _, job_id in ipairs(redis.call('ZRANGE', queue, 0, last)) do
    local cost = cost_of(job_id)
    if cost then read, read_mcu = read + 1, read_mcu + cost end
  end
end
for _, other in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if tonumber(other) > priority then
    local queue = ARGV[1] .. other
    local depth = redis.call('ZCARD', queue)
    ahead = ahead + depth
    read_costs(queue, depth - 1)
  end
end
read_costs(own_queue, rank - 1)

local own_mcu = cost_of(ARGV[3]) or 0
local ahead_mcu = read_mcu
if read < ahead then
  ahead_mcu = read_mcu + (ahead - read) * (read > 0 and read_mcu / read or own_mcu)
end

local pace = redis.call('HMGET', KEYS[5], 'seconds', 'mcu')
local reply = {ahead, math.floor(ahead_mcu), own_mcu, pace[1], pace[2]}
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
for _, reservation_id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[4], '(' .. now, '+inf')) do
  local held = redis.call('HGET', KEYS[3], reservation_id)
  if held then
    table.insert(reply, reservation_id)
    table.insert(reply, held)
  end
end
return reply
