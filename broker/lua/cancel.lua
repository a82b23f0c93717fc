-- cancel: a queued job is removed at once; a running one is flagged and its worker told
-- on the model's control channel (the worker aborts it and completes it as cancelled).
-- KEYS[1] job hash  P:job:<id>
-- KEYS[2] events    P:ev:<id>
-- KEYS[3] output    P:out:<id>
-- KEYS[4] token ids P:oid:<id>
-- KEYS[5] token index P:tix:<id>
-- ARGV: 1 P, 2 job id, 3 tenant ('' = any: admin), 4 events maxlen, 5 channel,
--   6 '1' = also return the job after the call (optional; the API answers with it)
-- Returns {code, status[, job hash as field, value, ..., output, output token ids]}: 0 OK (cancelled
--   now), 20 NOT_FOUND, 22 ALREADY_TERMINAL, 23 CANCEL_REQUESTED (running; the worker will finish it)
local P, jid = ARGV[1], ARGV[2]
local function answer(code, status)
  if ARGV[6] ~= '1' or code == 20 then return {code, status} end
  return {code, status, redis.call('HGETALL', KEYS[1]), redis.call('GET', KEYS[3]) or '',
    redis.call('GET', KEYS[4]) or ''}
end
local J = job_keys_from(KEYS, 1, ARGV[5])
local j = redis.call('HMGET', J.job, 'status', 'tenant', 'model', 'priority', 'cost', 'tpm', 'tpm_burst')
if not j[1] or (ARGV[3] ~= '' and ARGV[3] ~= j[2]) then return {20, ''} end
local mp = k_model(P, j[3])
if j[1] == STATUS.queued then
  local now = now_ms()
  unqueue(P, mp, jid, j[2], j[4], num(j[5], 0))
  refund_tokens(k_tenant_state(P, j[2]), num(j[6], 0), num(j[7], 0), num(j[5], 0), now)
  finish(J, STATUS.cancelled, EVENT.cancelled, cjson.encode({reason = STATUS.cancelled}), now, ARGV[4])
  return answer(0, STATUS.cancelled)
end
if j[1] == STATUS.running then
  redis.call('HSET', J.job, 'cancel', '1')
  redis.call('PUBLISH', k_control(mp), jid)
  return answer(23, STATUS.running)
end
return {22, j[1]}
