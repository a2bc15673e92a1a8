-- Append one event to a job's stream with the next per-job sequence number.
-- The stream id is "0-<seq>", so a client resumes from the last seq it saw (Last-Event-ID).
--
-- KEYS: 1 stream  2 sequence counter
-- ARGV: 1 event type  2 data (JSON)  3 ttl s  4 approximate max length
-- Returns the sequence number.

local seq = redis.call('INCR', KEYS[2])
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[4], '0-' .. seq, 'seq', seq, 'type', ARGV[1], 'data', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return seq
