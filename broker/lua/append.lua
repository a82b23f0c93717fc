-- append: add streamed output (one coalesced delta per write) to running jobs, fenced,
-- for every write of one worker flush in one call.
-- KEYS, 5 per write w (i = 5w - 4): job hash P:job:<id>, events P:ev:<id>, output P:out:<id>,
--   token ids P:oid:<id>, token index P:tix:<id>
-- ARGV[1] events maxlen; then 7 per write (j = 1 + 7(w - 1)): j+1 fence, j+2 text, j+3 token ids
--   (comma separated), j+4 token count, j+5 channel, j+6 offset: completion tokens already
--   written before this delta (-1 = unchecked; a delta whose tokens are already there, a call
--   replayed after its reply was lost, is acknowledged without being written twice),
--   j+7 the tokens' logprobs: JSON items without the brackets ('' = none asked for)
-- Returns one code per write, in order: 0 (written or a replay) or 21 (STALE_LEASE: nothing
-- written for that write). Writes of one job come in order; each sees the ones before it.
--
-- Per write: one HMGET, three APPENDs (text, token ids, the token index), one HSET and a
-- PUBLISH: the token event is not stored (emit_token; with logprobs it is); the counters a
-- delta moves are read together and written together; TIME once per call.
local maxlen, now = ARGV[1], now_ms()
local out, J = {}, {}
for w = 1, #KEYS / 5 do
  local i, j = 5 * w - 4, 1 + 7 * (w - 1)
  job_keys_from(KEYS, i, ARGV[j + 5], J)
  -- (the fields admission puts first, so each is found at once: admit.lua)
  local h = redis.call('HMGET', J.job, 'status', 'fence', 'completion_tokens', 'seq_out', 'evn', 'lev')
  local written, offset = num(h[3], 0), tonumber(ARGV[j + 6])
  if h[1] ~= STATUS.running or h[2] ~= ARGV[j + 1] then
    out[w] = 21
  elseif offset >= 0 and written > offset then
    out[w] = 0
  else
    local text, n, lp = ARGV[j + 2], ARGV[j + 4], ARGV[j + 7]
    local first = num(h[4], 0) == 0  -- the job's first token event: its first_token_ms
    local seq, evn, ct = int(num(h[4], 0) + 1), int(num(h[5], 0) + 1), written + tonumber(n)
    local len = write_output(J, text, ARGV[j + 3])
    local lev = emit_token(J, maxlen, h[6], seq, evn, len, ct, token_event(seq, text, n, lp), lp)
    if not (first or lev) then  -- the usual delta: no table made
      redis.call('HSET', J.job, 'seq_out', seq, 'evn', evn, 'completion_tokens', int(ct))
    else
      local f = {'seq_out', seq, 'evn', evn, 'completion_tokens', ct}
      if first then f[#f + 1] = 'first_token_ms'; f[#f + 1] = now end
      if lev then f[#f + 1] = 'lev'; f[#f + 1] = lev end
      redis.call('HSET', J.job, unpack(f))
    end
    out[w] = 0
  end
end
return out
