-- Count a reservation that was admitted while Redis was unreachable (fail-open tiers).
-- Only counters that exist are moved: a missing one is rebuilt from the ledger, which
-- already holds this reservation.
--
-- KEYS: 1 budget used  2 key used  3 reservation hash
-- ARGV: 1 mCU to add  2 "marker" to leave an active-reservation marker, else ""
--       3 cost  4 pool  5 ttl s

local amount = tonumber(ARGV[1])
if amount ~= 0 then
  if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('INCRBY', KEYS[1], amount) end
  if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('INCRBY', KEYS[2], amount) end
end
if ARGV[2] == 'marker' then
  redis.call('HSET', KEYS[3], 'state', 'admitted', 'cost', ARGV[3], 'pool', ARGV[4])
  redis.call('EXPIRE', KEYS[3], tonumber(ARGV[5]))
end
return 1
