-- GCRA: a bucket of `burst` units refilled at `rate` units per minute, stored as the
-- theoretical arrival time (TAT, ms) of the next unit. Taking `cost` units at `now` (ms):
-- returns allowed, ms until it would be, the TAT read (clamped to now), the TAT after taking,
-- and the bucket's interval and tolerance. Included by admit.lua and bucket_take.lua.
local function gcra(stored_tat, rate, burst, cost, now)
  local interval = 60000.0 / rate
  local tolerance = burst * interval
  local tat = tonumber(stored_tat or now)
  if tat < now then tat = now end
  local new_tat = tat + cost * interval
  local allow_at = new_tat - tolerance
  return allow_at <= now, math.ceil(allow_at - now), tat, new_tat, interval, tolerance
end
