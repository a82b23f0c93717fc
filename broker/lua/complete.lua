-- complete: finish running jobs (succeeded, or cancelled after the worker aborted them), each
-- with its last delta, fenced; refunds unreserved tokens and records the drain rate. One call
-- finishes every completion of a worker flush.
-- KEYS[1] leases        P:m:<model>:leases
-- KEYS[2] model stats   P:m:<model>:stats
-- then 6 per job c (i = 6c - 3): job hash P:job:<id>, events P:ev:<id>, output P:out:<id>,
--   token ids P:oid:<id>, token index P:tix:<id>, tenant state P:ts:<tenant>
-- ARGV[1] events maxlen; then 11 per job (j = 1 + 11(c - 1)): j+1 fence, j+2 last text,
--   j+3 last token ids (comma separated), j+4 last token count, j+5 finish reason,
--   j+6 final status (succeeded | cancelled), j+7 channel, j+8 job id, j+9 offset of the last
--   delta (as in append.lua; -1 = unchecked), j+10 prompt tokens as the engine counted them
--   (0 = keep), j+11 the last delta's logprobs (as in append.lua)
-- Returns one code per job, in order: 0 or 21 (STALE_LEASE: nothing written for that job).
--
-- Per job: one HMGET, one HSET, the events (the last delta's as in append.lua,
-- the final one XADD + PUBLISH), the TTLs;
-- the leases and the drain rate once per call.
local maxlen, now = ARGV[1], now_ms()
local now_s = int(now)  -- numbers are made strings once, by int (_lib.lua)
local out, done, jobs, tok = {}, {}, 0, 0
for c = 1, (#KEYS - 2) / 6 do
  local i, j = 6 * c - 3, 1 + 11 * (c - 1)
  local J = job_keys_from(KEYS, i, ARGV[j + 7])
  local h = redis.call('HMGET', J.job, 'status', 'fence', 'completion_tokens', 'prompt_tokens', 'cost', 'tpm',
    'tpm_burst', 'evn', 'seq_out', 'ttl', 'webhook', 'lev')
  if h[1] ~= STATUS.running or h[2] ~= ARGV[j + 1] then
    out[c] = 21
  else
    local text, n, offset = ARGV[j + 2], tonumber(ARGV[j + 4]), tonumber(ARGV[j + 9])
    local ct, pt, evn, seq = num(h[3], 0), num(h[4], 0), num(h[8], 0), num(h[9], 0)
    if offset >= 0 and ct > offset then n = -1 end  -- the last delta is already written (replay)
    local status, etype = STATUS.succeeded, EVENT.done
    if ARGV[j + 6] == STATUS.cancelled then status, etype = STATUS.cancelled, EVENT.cancelled end
    local f = {'status', status, 'finished_ms', now_s, 'finish_reason', ARGV[j + 5]}
    if tonumber(ARGV[j + 10]) > 0 then
      pt = tonumber(ARGV[j + 10])
      f[#f + 1] = 'prompt_tokens'; f[#f + 1] = ARGV[j + 10]
    end
    if n > 0 or (n == 0 and text ~= '') then
      seq, evn, ct = seq + 1, evn + 1, ct + n
      local len, lp, seq_s = write_output(J, text, ARGV[j + 3]), ARGV[j + 11], int(seq)
      emit_token(J, maxlen, h[12], seq_s, int(evn), len, ct, token_event(seq_s, text, ARGV[j + 4], lp), lp)
      f[#f + 1] = 'seq_out'; f[#f + 1] = seq_s
      f[#f + 1] = 'completion_tokens'; f[#f + 1] = ct
      if seq == 1 then f[#f + 1] = 'first_token_ms'; f[#f + 1] = now_s end  -- its first token event
    end
    local done_n = int(evn + 1)
    f[#f + 1] = 'evn'; f[#f + 1] = done_n
    redis.call('HSET', J.job, unpack(f))  -- its worker stays: the one that finished it
    emit_numbered(J, maxlen, done_n, etype,
      cjson.encode({finish_reason = ARGV[j + 5], usage = {prompt_tokens = pt, completion_tokens = ct,
        total_tokens = pt + ct}}), seq)
    -- reserved at admission: prompt (maybe estimated) + max_tokens; used: the engine's counts
    refund_tokens(KEYS[i + 5], num(h[6], 0), num(h[7], 0), num(h[5], 0) - pt - ct, now)
    webhook_due(J, h[11], ARGV[j + 8])
    expire_job(J, h[10] or DEFAULT_TTL_MS, seq > 0)
    done[#done + 1] = ARGV[j + 8]
    jobs, tok = jobs + 1, tok + ct
    out[c] = 0
  end
end
for k = 1, #done, 256 do  -- unpack stays far below Lua's stack limit
  redis.call('ZREM', KEYS[1], unpack(done, k, math.min(k + 255, #done)))
end
if jobs > 0 then drained(KEYS[2], now, jobs, tok) end
return out
