-- cancel: a queued job is removed at once; a running one is flagged and its worker told
-- on the model's control channel (the worker aborts it and completes it as cancelled).
-- KEYS[1] job hash  P:job:<id>
-- ARGV: 1 P, 2 job id, 3 tenant ('' = any: admin), 4 result ttl ms, 5 events maxlen
-- Returns {code, status}: 0 OK (cancelled now), 20 NOT_FOUND, 22 ALREADY_TERMINAL,
--   23 CANCEL_REQUESTED (running; the worker will finish it)
local P, jid = ARGV[1], ARGV[2]
local j = redis.call('HMGET', KEYS[1], 'status', 'tenant', 'model', 'priority', 'cost', 'tpm', 'tpm_burst')
if not j[1] or (ARGV[3] ~= '' and ARGV[3] ~= j[2]) then return {20, ''} end
local mp = P .. ':m:' .. j[3]
if j[1] == 'queued' then
  local now = now_ms()
  unqueue(P, mp, jid, j[2], j[4], num(j[5], 0))
  refund_tokens(P .. ':ts:' .. j[2], num(j[6], 0), num(j[7], 0), num(j[5], 0), now)
  finish(P, jid, 'cancelled', 'cancelled', cjson.encode({reason = 'cancelled'}), now,
    tonumber(ARGV[4]), ARGV[5])
  return {0, 'cancelled'}
end
if j[1] == 'running' then
  redis.call('HSET', KEYS[1], 'cancel', '1')
  redis.call('PUBLISH', mp .. ':ctl', jid)
  return {23, 'running'}
end
return {22, j[1]}
