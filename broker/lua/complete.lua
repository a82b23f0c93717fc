-- complete: finish a running job (succeeded, or cancelled after the worker aborted it),
-- with its last delta, fenced; refunds unreserved tokens and records the drain rate.
-- KEYS[1] job hash      P:job:<id>
-- KEYS[2] events        P:ev:<id>
-- KEYS[3] leases        P:m:<model>:leases
-- KEYS[4] model stats   P:m:<model>:stats
-- KEYS[5] tenant state  P:ts:<tenant>
-- KEYS[6] output        P:out:<id>
-- KEYS[7] token ids     P:oid:<id>
-- ARGV: 1 fence, 2 last text, 3 last token ids (comma separated), 4 last token count,
--       5 finish reason, 6 final status (succeeded | cancelled), 7 result ttl ms,
--       8 events maxlen, 9 channel, 10 P, 11 job id, 12 offset of the last delta (as in
--       append.lua; -1 = unchecked), 13 prompt tokens as the engine counted them (0 = keep)
-- Returns {0} or {21} (STALE_LEASE: nothing written)
if not fenced(KEYS[1], ARGV[1]) then return {21} end
local now = now_ms()
local n = tonumber(ARGV[4])
local offset = tonumber(ARGV[12] or '-1')
if offset >= 0 and num(redis.call('HGET', KEYS[1], 'completion_tokens'), 0) > offset then
  n = -1  -- the last delta is already written (replay)
end
if tonumber(ARGV[13] or '0') > 0 then redis.call('HSET', KEYS[1], 'prompt_tokens', ARGV[13]) end
if n > 0 or (n == 0 and ARGV[2] ~= '') then
  local seq = redis.call('HINCRBY', KEYS[1], 'seq_out', 1)
  redis.call('HSETNX', KEYS[1], 'first_token_ms', now)
  write_output(KEYS[6], KEYS[7], ARGV[2], ARGV[3])
  redis.call('HINCRBY', KEYS[1], 'completion_tokens', n)
  emit(KEYS[1], KEYS[2], ARGV[9], ARGV[8], 'token', cjson.encode({seq = seq, text = ARGV[2], n = n}))
end
local j = redis.call('HMGET', KEYS[1], 'prompt_tokens', 'completion_tokens', 'cost', 'tpm', 'tpm_burst')
local pt, ct = num(j[1], 0), num(j[2], 0)
redis.call('ZREM', KEYS[3], ARGV[11])
redis.call('HSET', KEYS[1], 'finish_reason', ARGV[5])
redis.call('HDEL', KEYS[1], 'worker')
-- reserved at admission: prompt (maybe estimated) + max_tokens; used: the engine's counts
refund_tokens(KEYS[5], num(j[4], 0), num(j[5], 0), num(j[3], 0) - pt - ct, now)
drained(KEYS[4], now, ct)
local etype = 'done'
if ARGV[6] == 'cancelled' then etype = 'cancelled' end
finish(ARGV[10], ARGV[11], ARGV[6], etype,
  cjson.encode({finish_reason = ARGV[5], usage = {prompt_tokens = pt, completion_tokens = ct,
    total_tokens = pt + ct}}), now, tonumber(ARGV[7]), ARGV[8])
return {0}
