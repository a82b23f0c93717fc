-- append: add streamed output (one coalesced delta) to a running job, fenced.
-- KEYS[1] job hash  P:job:<id>
-- KEYS[2] events    P:ev:<id>
-- KEYS[3] output    P:out:<id>
-- KEYS[4] token ids P:oid:<id>
-- ARGV: 1 fence, 2 text, 3 token ids (comma separated), 4 token count,
--       5 events maxlen, 6 channel, 7 offset: completion tokens already written before this
--       delta (-1 = unchecked). A delta whose tokens are already there (a pipeline replayed
--       after its reply was lost) is acknowledged without being written twice.
--       8 the tokens' logprobs: JSON items without the brackets ('' = none asked for)
-- Returns {0, event id} ({0, ''} for a replay) or {21} (STALE_LEASE: nothing written)
local J = job_keys_from(KEYS, 1, ARGV[6])
if not fenced(J.job, ARGV[1]) then return {21} end
local offset = tonumber(ARGV[7] or '-1')
if offset >= 0 and num(redis.call('HGET', J.job, 'completion_tokens'), 0) > offset then
  return {0, ''}
end
local now = now_ms()
local seq = redis.call('HINCRBY', J.job, 'seq_out', 1)
redis.call('HSETNX', J.job, 'first_token_ms', now)
write_output(J, ARGV[2], ARGV[3])
redis.call('HINCRBY', J.job, 'completion_tokens', tonumber(ARGV[4]))
local id = emit(J, ARGV[5], EVENT.token,
  token_event(seq, ARGV[2], tonumber(ARGV[4]), ARGV[8] or ''))
return {0, id}
