-- Move a tenant's counters by an operator's ledger adjustment (signed mCU). Only counters that
-- exist are moved: a missing one is rebuilt from the ledger, which holds the adjustment already.
-- (Dropping the budget counter for a rebuild instead lost what admissions Redis had counted and
-- the database not yet committed hold.)
--
-- KEYS: 1 budget used  2 key used
-- ARGV: 1 mCU to add (negative: a credit)

local amount = tonumber(ARGV[1])
for _, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then redis.call('INCRBY', key, amount) end
end
return 1
