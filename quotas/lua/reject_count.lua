-- Count one admission rejection under its error code, in the current hour's hash, for the
-- operator console. One script so the count and its expiry land together.
--
-- KEYS: 1 the hour's hash (code -> count)
-- ARGV: 1 error code  2 ttl s
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
return 1
