-- reap: leases that expired (their worker died or hung) go back to the queue with
-- attempts + 1; past max attempts the job fails with worker_lost. Queued jobs that never
-- ran and reached their deadline are expired.
-- KEYS[1] leases     P:m:<model>:leases
-- KEYS[2] deadlines  P:m:<model>:deadlines
-- ARGV: 1 P, 2 max jobs per call, 3 events maxlen
-- Returns a list of {job id, outcome}
local P = ARGV[1]
local now = now_ms()
local out = {}
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
for _, jid in ipairs(expired) do
  local J = job_keys(P, jid)
  if redis.call('HGET', J.job, 'status') == STATUS.running then
    out[#out + 1] = {jid, settle(P, J, jid, ERROR.worker_lost, 'lease expired', 1, now, ARGV[3])}
  else
    redis.call('ZREM', KEYS[1], jid)
  end
end
local late = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
for _, jid in ipairs(late) do
  redis.call('ZREM', KEYS[2], jid)
  if expire_queued(P, job_keys(P, jid), jid, now, ARGV[3]) then
    out[#out + 1] = {jid, STATUS.expired}
  end
end
return out
