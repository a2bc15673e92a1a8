-- Release a lock taken with SET NX PX only if it is still the caller's (KEYS[1] holds ARGV[1]):
-- a run that outlived its lock must not free the one another run took since.
if redis.call("GET", KEYS[1]) == ARGV[1] then
  return redis.call("DEL", KEYS[1])
end
return 0
