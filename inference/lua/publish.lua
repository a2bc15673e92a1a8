-- Append one event to a job's stream with the next per-job sequence number, and say whether
-- the job's tenant may have webhook endpoints (so most publishes need no database query) and
-- whether anyone listens to its live job list (so most publishes broadcast nothing).
-- The stream id is "0-<seq>", so a client resumes from the last seq it saw (Last-Event-ID).
--
-- An event a running attempt publishes carries that attempt and its attempt_seq, the attempt's
-- own count of the events it published (1, 2, ...). A publish whose reply was lost (a timeout
-- after the server ran it) is sent again, by redis-py or by the runner: the same (attempt,
-- attempt_seq) as the last one appended is that event, and is not appended twice (a stream's
-- follower would relay its tokens twice); its seq is returned, so the caller finishes what it
-- had not (broadcast, webhooks). An earlier one comes from an attempt the job was handed away
-- from, publishing after its successor did: dropped, seq 0.
--
-- A job ends once, and its stream takes one end: an end published again (redis-py retrying
-- after a lost reply, the reaper announcing an end whose worker published it and died before
-- clearing `terminal_event_pending`) is not appended; the first end's seq is returned, so the
-- caller finishes what it had not (broadcast, webhooks).
-- The mark lives in KEYS[5], which a deleted job keeps: a late end does not bring back the
-- stream that its delete removed. It expires with the stream (both are set the same TTL by
-- the end, the stream's last append).
--
-- KEYS: 1 stream  2 sequence counter  3 set of tenant ids with webhook endpoints, complete
--       when it holds the member '*' (it goes with the set if Redis loses or evicts it)
--       4 the tenant's Channels group (its members, kept by the channel layer on this Redis)
--       5 the attempt, attempt_seq and seq of the last event an attempt appended, and the
--         seq of the job's end once appended (`end`) (a hash)
-- ARGV: 1 event type  2 data (JSON)  3 ttl s  4 approximate max length  5 tenant id
--       6 the publishing attempt  7 the event's attempt_seq; both '' for an event published
--       outside a run (queued, an end): appended (an end once)  8 '1' for the job's end
-- Returns {seq, webhooks, listeners}: webhooks 1 the tenant has (or had) an endpoint, 0 it
-- has none, -1 the set must be rebuilt from the database first; listeners 1 when the group
-- has members.

local seq
if ARGV[8] == '1' then
  seq = tonumber(redis.call('HGET', KEYS[5], 'end'))
elseif ARGV[7] ~= '' then
  local attempt, attempt_seq = tonumber(ARGV[6]), tonumber(ARGV[7])
  local last = redis.call('HMGET', KEYS[5], 'attempt', 'attempt_seq', 'seq')
  local last_attempt, last_attempt_seq = tonumber(last[1]) or 0, tonumber(last[2]) or 0
  if attempt == last_attempt and attempt_seq == last_attempt_seq then
    seq = tonumber(last[3])
  elseif attempt < last_attempt or (attempt == last_attempt and attempt_seq < last_attempt_seq) then
    return {0, 0, 0}
  end
end
if not seq then
  seq = redis.call('INCR', KEYS[2])
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[4], '0-' .. seq, 'seq', seq, 'type', ARGV[1], 'data', ARGV[2])
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  redis.call('EXPIRE', KEYS[2], ARGV[3])
  if ARGV[7] ~= '' then
    redis.call('HSET', KEYS[5], 'attempt', ARGV[6], 'attempt_seq', ARGV[7], 'seq', seq)
    redis.call('EXPIRE', KEYS[5], ARGV[3])
  elseif ARGV[8] == '1' then
    redis.call('HSET', KEYS[5], 'end', seq)
    redis.call('EXPIRE', KEYS[5], ARGV[3])
  end
end
local webhooks = -1
if redis.call('SISMEMBER', KEYS[3], '*') == 1 then
  webhooks = redis.call('SISMEMBER', KEYS[3], ARGV[5])
end
return {seq, webhooks, redis.call('EXISTS', KEYS[4])}
