-- complete: finish a running job (succeeded, or cancelled after the worker aborted it),
-- with its last delta, fenced; refunds unreserved tokens and records the drain rate.
-- KEYS[1] job hash      P:job:<id>
-- KEYS[2] events        P:ev:<id>
-- KEYS[3] output        P:out:<id>
-- KEYS[4] token ids     P:oid:<id>
-- KEYS[5] leases        P:m:<model>:leases
-- KEYS[6] model stats   P:m:<model>:stats
-- KEYS[7] tenant state  P:ts:<tenant>
-- ARGV: 1 fence, 2 last text, 3 last token ids (comma separated), 4 last token count,
--       5 finish reason, 6 final status (succeeded | cancelled), 7 events maxlen, 8 channel,
--       9 job id, 10 offset of the last delta (as in append.lua; -1 = unchecked),
--       11 prompt tokens as the engine counted them (0 = keep), 12 the last delta's logprobs
--       (as in append.lua)
-- Returns {0} or {21} (STALE_LEASE: nothing written)
local J = job_keys_from(KEYS, 1, ARGV[8])
if not fenced(J.job, ARGV[1]) then return {21} end
local now = now_ms()
local n = tonumber(ARGV[4])
local offset = tonumber(ARGV[10] or '-1')
if offset >= 0 and num(redis.call('HGET', J.job, 'completion_tokens'), 0) > offset then
  n = -1  -- the last delta is already written (replay)
end
if tonumber(ARGV[11] or '0') > 0 then redis.call('HSET', J.job, 'prompt_tokens', ARGV[11]) end
if n > 0 or (n == 0 and ARGV[2] ~= '') then
  local seq = redis.call('HINCRBY', J.job, 'seq_out', 1)
  redis.call('HSETNX', J.job, 'first_token_ms', now)
  write_output(J, ARGV[2], ARGV[3])
  redis.call('HINCRBY', J.job, 'completion_tokens', n)
  emit(J, ARGV[7], EVENT.token, token_event(seq, ARGV[2], n, ARGV[12] or ''))
end
local j = redis.call('HMGET', J.job, 'prompt_tokens', 'completion_tokens', 'cost', 'tpm', 'tpm_burst')
local pt, ct = num(j[1], 0), num(j[2], 0)
redis.call('ZREM', KEYS[5], ARGV[9])
redis.call('HSET', J.job, 'finish_reason', ARGV[5])
redis.call('HDEL', J.job, 'worker')
-- reserved at admission: prompt (maybe estimated) + max_tokens; used: the engine's counts
refund_tokens(KEYS[7], num(j[4], 0), num(j[5], 0), num(j[3], 0) - pt - ct, now)
drained(KEYS[6], now, ct)
local status, etype = STATUS.succeeded, EVENT.done
if ARGV[6] == STATUS.cancelled then status, etype = STATUS.cancelled, EVENT.cancelled end
finish(J, status, etype,
  cjson.encode({finish_reason = ARGV[5], usage = {prompt_tokens = pt, completion_tokens = ct,
    total_tokens = pt + ct}}), now, ARGV[7])
return {0}
