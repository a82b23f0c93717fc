-- webhook_note: record a webhook's delivery state on its job or batch, only while the record
-- exists (a job whose result expired is not brought back without its TTL).
-- KEYS[1] record  P:job:<id> or P:batch:<id>
-- ARGV: 1 attempts (JSON list), 2 state (pending | delivered | failed)
-- Returns 1 when written, 0 when the record is gone
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'wh_attempts', ARGV[1], 'wh_state', ARGV[2])
return 1
