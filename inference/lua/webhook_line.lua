-- The line of deliveries waiting for a webhook endpoint's slots, for the scripts that include
-- it (webhook_slot_take.lua, webhook_slot_release.lua). Members are "<delivery id>:<attempt>",
-- all scored 0: delivery ids are ULIDs of one length, so the line's lexical order is the
-- deliveries' creation order. A second zset holds when each member loses its place.

-- Members that did not come back in time (their message was lost, their worker died) leave
-- the line, so they hold up nobody behind them for longer than that.
local function line_expire(line_key, places_key, now)
  local gone = redis.call('ZRANGEBYSCORE', places_key, '-inf', now)
  for _, member in ipairs(gone) do
    redis.call('ZREM', line_key, member)
  end
  if #gone > 0 then redis.call('ZREMRANGEBYSCORE', places_key, '-inf', now) end
end

local function now_ms()
  local time = redis.call('TIME')
  return tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
end
