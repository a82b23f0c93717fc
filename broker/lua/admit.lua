-- admit: accept one job into its model's queue, or refuse it, atomically.
-- KEYS[1] job hash          P:job:<id>
-- KEYS[2] idempotency key   P:idem:<tenant>:<key>   (unused when ARGV[8] == '0')
-- KEYS[3] tenant limits     P:tenant:<t>
-- KEYS[4] tenant state      P:ts:<t>
-- KEYS[5] tenant jobs       P:tjobs:<t>
-- KEYS[6] models            P:models
-- KEYS[7] global            P:global
-- KEYS[8] model stats       P:m:<model>:stats
-- ARGV: 1 P, 2 job id, 3 tenant, 4 model, 5 priority, 6 prompt_tokens, 7 max_tokens,
--       8 has idempotency key (0/1), 9 request JSON, 10 result ttl ms (the job's), 11 max queued
--       (global), 12-17 default rpm, rpm_burst, tpm, tpm_burst, max_queued, weight,
--       18 deadline ms (0 = none), 19 max_attempts,
--       20 request fingerprint (a repeated idempotency key must carry the same; '' without a key),
--       21 webhook URL ('' = the tenant's default `webhook_url`, '-' = none),
--       22 '1' = also return the admitted job's record (optional: the API's 202 is built from it)
-- Returns {code, job id, position, rq_limit, rq_remaining, rq_reset_ms,
--          tk_limit, tk_remaining, tk_reset_ms, retry_after_ms[, job hash as field, value, ...]}
--   code 0 OK, 1 DUPLICATE (job id = the earlier job), 10 RATE_REQUESTS, 11 RATE_TOKENS,
--   12 TENANT_QUEUE_FULL, 13 QUEUE_FULL, 14 TOO_LARGE_FOR_LIMIT, 15 UNKNOWN_MODEL,
--   16 CONTEXT_TOO_LONG (position = the model's max_model_len), 17 PRIORITY_NOT_ALLOWED,
--   18 IDEMPOTENCY_CONFLICT (job id = the earlier job: same key, another request);
--   for 14 TOO_LARGE_FOR_LIMIT position = the tenant's token burst
local P, jid, tenant, model = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local prio, pt, mt = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local mp = k_model(P, model)
local job = KEYS[1]

-- A replay of this very call (client retry after a lost reply) must not enqueue twice.
if redis.call('EXISTS', job) == 1 then
  return {1, jid, num(redis.call('ZRANK', k_queued(mp), jid), 0), 0, 0, 0, 0, 0, 0, 0}
end

if ARGV[8] == '1' then
  local prev = redis.call('GET', KEYS[2])
  if prev and redis.call('EXISTS', k_job(P, prev)) == 1 then
    local fp = redis.call('HGET', k_job(P, prev), 'fp')
    if fp and fp ~= ARGV[20] then return {18, prev, 0, 0, 0, 0, 0, 0, 0, 0} end
    return {1, prev, num(redis.call('ZRANK', k_queued(mp), prev), 0), 0, 0, 0, 0, 0, 0, 0}
  end
end

local minfo = redis.call('HGET', KEYS[6], model)
if not minfo then return {15, '', 0, 0, 0, 0, 0, 0, 0, 0} end
local mlen = num(cjson.decode(minfo)['max_model_len'], 0)
if mlen > 0 and pt + mt > mlen then return {16, '', mlen, 0, 0, 0, 0, 0, 0, 0} end

local L = redis.call('HMGET', KEYS[3], 'rpm', 'rpm_burst', 'tpm', 'tpm_burst', 'max_queued', 'weight', 'priorities',
  'webhook_url')
local rpm, rpm_b = num(L[1], tonumber(ARGV[12])), num(L[2], tonumber(ARGV[13]))
local tpm, tpm_b = num(L[3], tonumber(ARGV[14])), num(L[4], tonumber(ARGV[15]))
local maxq, weight = num(L[5], tonumber(ARGV[16])), num(L[6], tonumber(ARGV[17]))
if rpm_b <= 0 then rpm_b = rpm end
if tpm_b <= 0 then tpm_b = tpm end
if L[7] and not string.find(L[7], tostring(prio), 1, true) then
  return {17, '', 0, 0, 0, 0, 0, 0, 0, 0}
end

local now = now_ms()
local now_s = int(now)  -- numbers are made strings once, by int (_lib.lua)
-- Counters this admission moves are read together here and written together at the end.
local stats = redis.call('HMGET', KEYS[8], 'dr', 'w_start', 'w_jobs', 'd' .. ARGV[5], 'k' .. ARGV[5])
local drain = num(stats[1], 0)
if drain <= 0 and stats[2] and now > tonumber(stats[2]) then
  drain = num(stats[3], 0) * 1000 / math.max(1000, now - tonumber(stats[2]))
end
local function wait_for(excess)
  if drain <= 0 then return 1000 end
  return math.max(1, math.ceil(excess * 1000 / drain))
end

local g = redis.call('HMGET', KEYS[7], 'queued', 'seq')
local gq = num(g[1], 0)
if gq >= tonumber(ARGV[11]) then
  return {13, '', 0, 0, 0, 0, 0, 0, 0, wait_for(gq - tonumber(ARGV[11]) + 1)}
end
local ts = redis.call('HMGET', KEYS[4], 'q', 'rq', 'rq_ts', 'tk', 'tk_ts')
local tq = num(ts[1], 0)
if maxq > 0 and tq >= maxq then
  return {12, '', 0, 0, 0, 0, 0, 0, 0, wait_for(1)}
end

local cost = pt + mt
if tpm > 0 and cost > tpm_b then return {14, '', tpm_b, 0, 0, 0, tpm, 0, 0, 0} end
local rq_left, rq_reset, tk_left, tk_reset = -1, 0, -1, 0
local rq_level, tk_level
if rpm > 0 then
  rq_level = refilled(ts[2], ts[3], rpm, rpm_b, now)
  if rq_level < 1 then
    local wait = math.ceil((1 - rq_level) * 60000 / rpm)
    return {10, '', 0, rpm, 0, wait, tpm, 0, 0, wait}
  end
end
if tpm > 0 then
  tk_level = refilled(ts[4], ts[5], tpm, tpm_b, now)
  if tk_level < cost then
    local wait = math.ceil((cost - tk_level) * 60000 / tpm)
    return {11, '', 0, rpm, math.floor(rq_level or 0), 0, tpm, math.floor(tk_level), wait, wait}
  end
end
local state = {'q', int(tq + 1)}
if rpm > 0 then
  rq_level = rq_level - 1
  state[#state + 1] = 'rq'; state[#state + 1] = rq_level
  state[#state + 1] = 'rq_ts'; state[#state + 1] = now_s
  rq_left, rq_reset = math.floor(rq_level), math.ceil((rpm_b - rq_level) * 60000 / rpm)
end
if tpm > 0 then
  tk_level = tk_level - cost
  state[#state + 1] = 'tk'; state[#state + 1] = tk_level
  state[#state + 1] = 'tk_ts'; state[#state + 1] = now_s
  tk_left, tk_reset = math.floor(tk_level), math.ceil((tpm_b - tk_level) * 60000 / tpm)
end
redis.call('HSET', KEYS[4], unpack(state))
local seq = int(num(g[2], 0) + 1)
redis.call('HSET', KEYS[7], 'seq', seq, 'queued', int(gq + 1))
redis.call('HSET', KEYS[8], 'd' .. ARGV[5], int(num(stats[4], 0) + 1), 'k' .. ARGV[5], int(num(stats[5], 0) + cost))

local ttl = ARGV[10]
local deadline = tonumber(ARGV[18])
local pscore = int(prio * 1e13 + now)
-- Fields at the value every reader takes for a missing one (num() defaults, Job.from_hash) are
-- left out: counters that start at 0 (attempts, fence, completion_tokens; deadline_ms 0 = none).
-- The fields every delta reads come first, the ones written later among them (a hash this small
-- is a list: a field is found by a scan from its start, and HMGET of the last 7 of 25 cost 1.17
-- µs, of the first 7 0.52 µs); lev ('' while queued) is set at the first start (claim.lua).
local f = {'status', STATUS.queued, 'fence', '0', 'completion_tokens', '0', 'seq_out', '0', 'evn', '1', 'lev', '',
  'id', jid, 'tenant', tenant, 'model', model, 'priority', ARGV[5], 'max_attempts', ARGV[19], 'request', ARGV[9],
  'prompt_tokens', ARGV[6], 'max_tokens', ARGV[7], 'cost', int(cost),
  'created_ms', now_s, 'seq', seq, 'pscore', pscore}
-- So are a weight of 1, no token rate and the default TTL (each HSET field costs every later one)
if weight ~= 1 then f[#f + 1] = 'weight'; f[#f + 1] = weight end
if tpm > 0 then
  f[#f + 1] = 'tpm'; f[#f + 1] = tpm
  f[#f + 1] = 'tpm_burst'; f[#f + 1] = tpm_b
end
if tonumber(ttl) ~= DEFAULT_TTL_MS then f[#f + 1] = 'ttl'; f[#f + 1] = ttl end
if deadline > 0 then f[#f + 1] = 'deadline_ms'; f[#f + 1] = ARGV[18] end
-- the request's fingerprint is read only through an idempotency key: kept only with one
if ARGV[8] == '1' then f[#f + 1] = 'fp'; f[#f + 1] = ARGV[20] end
local webhook = ARGV[21] or ''
if webhook == '' then webhook = L[8] or '' end
if webhook ~= '' and webhook ~= '-' then f[#f + 1] = 'webhook'; f[#f + 1] = webhook end
redis.call('HSET', job, unpack(f))
enqueue(P, mp, jid, tenant, ARGV[5], seq, pscore, cost, true)
if deadline > 0 then redis.call('ZADD', k_deadlines(mp), deadline, jid) end
redis.call('ZADD', KEYS[5], now_s, jid)
-- entries older than the TTL name expired jobs (a listing skips them): dropped at about one
-- admission in 16, by the millisecond clock (not by seq: with 16 tenants taking turns, one
-- tenant's admissions would all fall on a multiple of 16, another's never)
if now % 16 == 0 then redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now - tonumber(ttl)) end
if ARGV[8] == '1' then redis.call('SET', KEYS[2], jid, 'PX', ttl) end
-- The first event, queued (evn 1), is not stored: readers make it from the hash (QUEUED_EVENT_ID in
-- broker/events.py), so a queued job has no stream yet (~600 bytes less; its first write, the claim's).
local pos = redis.call('ZCOUNT', k_queued(mp), '-inf', '(' .. pscore)
local reply = {0, jid, pos, rpm, rq_left, rq_reset, tpm, tk_left, tk_reset, 0}
if ARGV[22] == '1' then  -- the hash is what f wrote (a new job): f as HSET stored it (Lua numbers as strings)
  for i = 2, #f, 2 do f[i] = tostring(f[i]) end
  reply[11] = f
end
return reply
