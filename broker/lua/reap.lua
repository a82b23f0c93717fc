-- reap: leases that expired (their worker died or hung) go back to the queue with
-- attempts + 1; past max attempts the job fails with worker_lost.
-- KEYS[1] leases  P:m:<model>:leases
-- ARGV: 1 P, 2 max jobs per call, 3 result ttl ms, 4 events maxlen
-- Returns a list of {job id, outcome}
local now = now_ms()
local out = {}
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
for _, jid in ipairs(expired) do
  local status = redis.call('HGET', ARGV[1] .. ':job:' .. jid, 'status')
  if status == 'running' then
    out[#out + 1] = {jid, settle(ARGV[1], jid, 'worker_lost', 'lease expired', 1, now,
      tonumber(ARGV[3]), ARGV[4])}
  else
    redis.call('ZREM', KEYS[1], jid)
  end
end
return out
