-- Count a reservation that was admitted while Redis was unreachable (fail-open tiers), or
-- settled while it was: its charge, or what it holds while active. Only counters that exist
-- are moved: a missing one is rebuilt from the ledger, which already holds this reservation.
-- A reservation whose marker exists is counted already (or a rebuild left its tombstone):
-- nothing is added, checked here so that no rebuild can land between the check and the count.
--
-- KEYS: 1 budget used  2 key used  3 reservation hash
-- ARGV: 1 mCU to add  2 "marker" to leave an active-reservation marker, else ""
--       3 cost  4 pool  5 ttl s
-- Returns 1 when counted now, 0 when its marker was there (the caller releases it if settled).

if redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
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
