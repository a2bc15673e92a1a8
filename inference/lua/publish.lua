-- Append one event to a job's stream with the next per-job sequence number, and say whether
-- the job's tenant may have webhook endpoints (so most publishes need no database query) and
-- whether anyone listens to its live job list (so most publishes broadcast nothing).
-- The stream id is "0-<seq>", so a client resumes from the last seq it saw (Last-Event-ID).
--
-- KEYS: 1 stream  2 sequence counter  3 set of tenant ids with webhook endpoints, complete
--       when it holds the member '*' (it goes with the set if Redis loses or evicts it)
--       4 the tenant's Channels group (its members, kept by the channel layer on this Redis)
-- ARGV: 1 event type  2 data (JSON)  3 ttl s  4 approximate max length  5 tenant id
-- Returns {seq, webhooks, listeners}: webhooks 1 the tenant has (or had) an endpoint, 0 it
-- has none, -1 the set must be rebuilt from the database first; listeners 1 when the group
-- has members.

local seq = redis.call('INCR', KEYS[2])
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[4], '0-' .. seq, 'seq', seq, 'type', ARGV[1], 'data', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
local webhooks = -1
if redis.call('SISMEMBER', KEYS[3], '*') == 1 then
  webhooks = redis.call('SISMEMBER', KEYS[3], ARGV[5])
end
return {seq, webhooks, redis.call('EXISTS', KEYS[4])}
