-- Shared helpers, prepended to every script when it is loaded (Redis 6.2 has no
-- FUNCTION LOAD).
--
-- Numbers: redis.call formats every number argument with "%.17g" (0.35 µs each on Redis 7.0,
-- more than a whole HSET of strings: 0.26 µs), tostring and a concatenation with "%.14g" (0.33,
-- 0.25 µs): an integer a hot path writes is made a string once, by int (0.16 µs), and one read
-- from Redis or ARGV is passed on as the string it is.
--
-- Names: every status, event type and error code a script writes is taken from the
-- tables below, which mirror broker/contract.py (tests/test_lua_contract.py checks
-- both ways). Keys: a key whose job id Python knows reaches a script through KEYS;
-- a key a script discovers itself (a claimed or expired job, a tenant's queue) is
-- built by one of the k_* functions below, each tied by a test to its builder in
-- broker/keys.py. They all carry the queue's hash tag, so they live in the same
-- Cluster slot as KEYS.

local STATUS = {queued = 'queued', running = 'running', succeeded = 'succeeded', failed = 'failed',
  cancelled = 'cancelled', expired = 'expired'}
local EVENT = {queued = 'queued', started = 'started', token = 'token', retry = 'retry', done = 'done',
  failed = 'failed', cancelled = 'cancelled', expired = 'expired'}
local LOWEST_PRIORITY = 9  -- contract.JobSpec.priority's bound
local ERROR = {worker_lost = 'worker_lost', deadline_exceeded = 'deadline_exceeded'}

-- key builders (P = 'genq:{<queue>}', mp = k_model(P, model))
local function k_job(P, jid) return P .. ':job:' .. jid end
local function k_events(P, jid) return P .. ':ev:' .. jid end
local function k_output(P, jid) return P .. ':out:' .. jid end
local function k_output_ids(P, jid) return P .. ':oid:' .. jid end
local function k_token_index(P, jid) return P .. ':tix:' .. jid end
local function k_channel(P, jid) return P .. ':ch:' .. jid end
local function k_global(P) return P .. ':global' end
local function k_tenant_state(P, tenant) return P .. ':ts:' .. tenant end
local function k_model(P, model) return P .. ':m:' .. model end
local function k_stats(mp) return mp .. ':stats' end
local function k_queued(mp) return mp .. ':queued' end
local function k_leases(mp) return mp .. ':leases' end
local function k_deadlines(mp) return mp .. ':deadlines' end
local function k_wake(mp) return mp .. ':wake' end
local function k_wake_urgent(mp) return mp .. ':wake_u' end
local function k_control(mp) return mp .. ':ctl' end
local function k_tenants(mp, prio) return mp .. ':p' .. prio .. ':tenants' end
local function k_vtc(mp, prio) return mp .. ':p' .. prio .. ':vtc' end
local function k_tenant_queue(mp, prio, tenant) return mp .. ':p' .. prio .. ':t:' .. tenant end
local function k_webhooks(P) return P .. ':webhooks' end

-- A job's own keys: {job, ev, out, oid, tix, ch}, from KEYS (first index i, five keys: Keys.job_keys)
-- or built here. ``into``: a table to fill instead of a new one (a loop over many jobs then makes
-- no garbage per job).
local function job_keys_from(keys, i, channel, into)
  local J = into or {}
  J.job, J.ev, J.out, J.oid, J.tix, J.ch = keys[i], keys[i + 1], keys[i + 2], keys[i + 3], keys[i + 4], channel
  return J
end
local function job_keys(P, jid)
  return {job = k_job(P, jid), ev = k_events(P, jid), out = k_output(P, jid), oid = k_output_ids(P, jid),
    tix = k_token_index(P, jid), ch = k_channel(P, jid)}
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- An integer as a string, by string.format's integer path.
local function int(n) return string.format('%d', n) end

local function num(v, default)
  if v == false or v == nil or v == '' then return default end
  return tonumber(v)
end

-- Append one event to the job's stream and publish "<id>\n<n>\n<type>\n<data>" on its
-- channel; n counts the job's events (1, 2, ...) so a live follower can tell a gap; s is the
-- job's token events so far (seq_out; a token event's own seq), where the token events rebuilt
-- from the token index go around it (broker.events).
local function emit_numbered(J, maxlen, n, etype, data, s)  -- n: the job's evn, already counted
  local id = redis.call('XADD', J.ev, 'MAXLEN', '~', maxlen, '*', 'n', n, 't', etype, 'd', data, 's', s)
  redis.call('PUBLISH', J.ch, id .. '\n' .. n .. '\n' .. etype .. '\n' .. data)
  return id
end
local function emit(J, maxlen, etype, data, s)
  return emit_numbered(J, maxlen, redis.call('HINCRBY', J.job, 'evn', 1), etype, data, s)
end

-- One token event (seq, evn counted, as strings; len, tokens: the output's bytes and completion
-- tokens after it). A job with a token index (lev: the id of its latest stored event, set from its first start)
-- writes the event's place there, 16 hex digits, and publishes it with the id <lev>-<seq>, not
-- stored: broker.events rebuilds it from the index and the output. A token event with logprobs
-- (their only copy), or of a job started before token indexes, is stored.
-- Returns the stored event's id (the job's new lev) or nil.
local function emit_token(J, maxlen, lev, seq, evn, len, tokens, data, logprobs)
  if not lev then emit_numbered(J, maxlen, evn, EVENT.token, data, seq); return nil end
  redis.call('APPEND', J.tix, string.format('%08x%08x', len, tokens))
  if logprobs ~= '' then return emit_numbered(J, maxlen, evn, EVENT.token, data, seq) end
  redis.call('PUBLISH', J.ch, lev .. '-' .. seq .. '\n' .. evn .. '\n' .. EVENT.token .. '\n' .. data)
  return nil
end

-- Token bucket: its level refilled to now, from the stored level and its time.
local function refilled(have, ts, per_min, burst, now)
  local level = num(have, burst) + (now - num(ts, now)) * per_min / 60000
  if level > burst then level = burst end
  return level
end
-- Token bucket: current level (refilled to now) of field f in hash state.
local function bucket_level(state, f, per_min, burst, now)
  local v = redis.call('HMGET', state, f, f .. '_ts')
  return refilled(v[1], v[2], per_min, burst, now)
end

-- A negative amount charges what an estimate undercounted.
local function refund_tokens(state, per_min, burst, amount, now)
  if per_min <= 0 or amount == 0 then return end
  local level = bucket_level(state, 'tk', per_min, burst, now) + amount
  if level > burst then level = burst end
  redis.call('HSET', state, 'tk', level, 'tk_ts', now)
end

-- A tenant stops being backlogged at one priority: remember its virtual counter,
-- or forget all counters when nobody is backlogged any more.
local function leave(mp, prio, tenant)
  local tz = k_tenants(mp, prio)
  local v = redis.call('ZSCORE', tz, tenant)
  redis.call('ZREM', tz, tenant)
  local vk = k_vtc(mp, prio)
  if redis.call('ZCARD', tz) == 0 then
    redis.call('DEL', vk)
  elseif v then
    redis.call('HSET', vk, tenant, v)
  end
end

-- Put a job (back) into its tenant's FIFO at its priority; a tenant that becomes
-- backlogged starts at max(own counter, lowest backlogged counter) (VTC "lift").
-- counted: the caller has moved the counters (queued jobs and tokens per priority, the
-- tenant's and the global queued counts) itself.
local function enqueue(P, mp, jid, tenant, prio, seq, pscore, cost, counted)
  local tq = k_tenant_queue(mp, prio, tenant)
  local tz = k_tenants(mp, prio)
  redis.call('ZADD', tq, seq, jid)
  if not redis.call('ZSCORE', tz, tenant) then
    local v = num(redis.call('HGET', k_vtc(mp, prio), tenant), 0)
    local low = redis.call('ZRANGE', tz, 0, 0, 'WITHSCORES')
    if low[2] and tonumber(low[2]) > v then v = tonumber(low[2]) end
    redis.call('ZADD', tz, v, tenant)
  end
  redis.call('ZADD', k_queued(mp), pscore, jid)
  if not counted then
    redis.call('HINCRBY', k_stats(mp), 'd' .. prio, 1)
    redis.call('HINCRBY', k_stats(mp), 'k' .. prio, cost)
    redis.call('HINCRBY', k_tenant_state(P, tenant), 'q', 1)
    redis.call('HINCRBY', k_global(P), 'queued', 1)
  end
  -- a wake-up for a claimer blocked in BLPOP; 64 are plenty (a backlog finds the list full: one LLEN)
  local wake = k_wake(mp)
  if redis.call('LLEN', wake) < 64 then redis.call('RPUSH', wake, '1') end
  if tonumber(prio) < LOWEST_PRIORITY then  -- work that may preempt: wakes full workers too (claim.lua's max priority)
    wake = k_wake_urgent(mp)
    if redis.call('LLEN', wake) < 64 then redis.call('RPUSH', wake, '1') end
  end
end

-- Take a queued job out of the queue structures (claim, cancel, deadline).
local function unqueue(P, mp, jid, tenant, prio, cost)
  local tq = k_tenant_queue(mp, prio, tenant)
  if redis.call('ZREM', tq, jid) == 0 then return false end
  if redis.call('ZCARD', tq) == 0 then leave(mp, prio, tenant) end
  redis.call('ZREM', k_queued(mp), jid)
  redis.call('ZREM', k_deadlines(mp), jid)
  redis.call('HINCRBY', k_stats(mp), 'd' .. prio, -1)
  redis.call('HINCRBY', k_stats(mp), 'k' .. prio, -cost)
  redis.call('HINCRBY', k_tenant_state(P, tenant), 'q', -1)
  redis.call('HINCRBY', k_global(P), 'queued', -1)
  return true
end

-- Webhooks due, kept at most this many (a bound for a deployment with no batcher running).
local WEBHOOKS_MAXLEN = 1000000

-- Move a job to a terminal status, announce it, and start its TTL (the job's own,
-- set at admission). A job with a webhook is added to the webhooks due (the batcher
-- delivers it), in the same call, so no terminal state is ever missed.
local DEFAULT_TTL_MS = 86400000

-- A finished job with a webhook is due for delivery (the batcher reads P:webhooks).
local function webhook_due(J, webhook, jid)
  if webhook and webhook ~= '' then  -- P is the job key less its ':job:<id>' suffix (5 + #id characters)
    local P = string.sub(J.job, 1, #J.job - #jid - 5)
    redis.call('XADD', k_webhooks(P), 'MAXLEN', '~', WEBHOOKS_MAXLEN, '*', 'k', 'job', 'id', jid)
  end
end

-- A finished job's keys live for its TTL (ms, a string as the hash holds it; output keys only
-- exist once something was written).
local function expire_job(J, ttl, has_output)
  redis.call('PEXPIRE', J.job, ttl)
  redis.call('PEXPIRE', J.ev, ttl)
  if has_output then
    redis.call('PEXPIRE', J.out, ttl)
    redis.call('PEXPIRE', J.oid, ttl)
    redis.call('PEXPIRE', J.tix, ttl)
  end
end

local function finish(J, status, etype, data, now, maxlen)
  redis.call('HSET', J.job, 'status', status, 'finished_ms', now)
  local j = redis.call('HMGET', J.job, 'ttl', 'webhook', 'id', 'seq_out')
  emit(J, maxlen, etype, data, num(j[4], 0))
  webhook_due(J, j[2], j[3])
  expire_job(J, j[1] or DEFAULT_TTL_MS, true)
end

-- A queued job that never ran reached its deadline: out of the queue, tokens back, expired.
local function expire_queued(P, J, jid, now, maxlen)
  local j = redis.call('HMGET', J.job, 'status', 'model', 'tenant', 'priority', 'cost', 'tpm', 'tpm_burst')
  if j[1] ~= STATUS.queued then return false end
  unqueue(P, k_model(P, j[2]), jid, j[3], j[4], num(j[5], 0))
  refund_tokens(k_tenant_state(P, j[3]), num(j[6], 0), num(j[7], 0), num(j[5], 0), now)
  local message = 'the job was still queued at its deadline'
  redis.call('HSET', J.job, 'error_code', ERROR.deadline_exceeded, 'error_message', message)
  finish(J, STATUS.expired, EVENT.expired, cjson.encode({code = ERROR.deadline_exceeded, message = message}),
    now, maxlen)
  return true
end

-- A token event's data, {"seq":..,"text":..,"n":..[,"logprobs":[..]]}, written out (no table to
-- encode per delta: only the text needs cjson's escaping). The logprobs come as JSON items
-- already (the worker encoded them): spliced in as they are, Redis parses none of it.
-- seq and n: integers, as strings (or numbers).
local function token_event(seq, text, n, logprobs)
  if logprobs == '' then return string.format('{"seq":%s,"text":%s,"n":%s}', seq, cjson.encode(text), n) end
  return string.format('{"seq":%s,"text":%s,"n":%s,"logprobs":[%s]}', seq, cjson.encode(text), n, logprobs)
end

-- Append one delta's text and token ids; O(1) in the output's length. Returns the output's length.
local function write_output(J, text, ids)
  local len
  if text ~= '' then len = redis.call('APPEND', J.out, text) else len = redis.call('STRLEN', J.out) end
  if ids ~= '' then redis.call('APPEND', J.oid, ',' .. ids) end
  return len
end

-- Completed-job drain rate over a short window (jobs/s and tokens/s).
local function drained(stats, now, njobs, ntok)
  local w = redis.call('HMGET', stats, 'w_start', 'w_jobs', 'w_tok')
  local ws = num(w[1], now)
  if w[1] == false then redis.call('HSET', stats, 'w_start', now) end
  local span = now - ws
  if span >= 2000 then
    local jobs = num(w[2], 0) + njobs
    local tok = num(w[3], 0) + ntok
    redis.call('HSET', stats, 'dr', jobs * 1000 / span, 'dt', tok * 1000 / span,
      'w_start', now, 'w_jobs', 0, 'w_tok', 0)
  else
    redis.call('HSET', stats, 'w_jobs', num(w[2], 0) + njobs, 'w_tok', num(w[3], 0) + ntok)
  end
end

-- A running job lost its worker or failed: requeue it (attempts left), else fail it.
-- A job whose cancel was requested is cancelled instead. Returns the outcome (a status).
local function settle(P, J, jid, code, message, retry, now, maxlen)
  local j = redis.call('HMGET', J.job, 'model', 'tenant', 'priority', 'attempts', 'max_attempts',
    'seq', 'pscore', 'cost', 'cancel', 'tpm', 'tpm_burst', 'max_tokens', 'completion_tokens', 'seq_out', 'lev')
  local mp = k_model(P, j[1])
  redis.call('ZREM', k_leases(mp), jid)
  redis.call('HDEL', J.job, 'worker')
  local unused = num(j[12], 0) - num(j[13], 0)
  if j[9] == '1' then
    refund_tokens(k_tenant_state(P, j[2]), num(j[10], 0), num(j[11], 0), unused, now)
    finish(J, STATUS.cancelled, EVENT.cancelled, cjson.encode({reason = STATUS.cancelled}), now, maxlen)
    return STATUS.cancelled
  end
  if retry == 2 then  -- handed back unstarted-by-fault (worker shutdown): the attempt is not spent
    j[4] = redis.call('HINCRBY', J.job, 'attempts', -1)
  end
  if retry >= 1 and num(j[4], 0) < num(j[5], 1) then
    local id = emit(J, maxlen, EVENT.retry, cjson.encode({attempt = num(j[4], 0), reason = code, message = message}),
      num(j[14], 0))
    if j[15] then  -- the token events of the next attempt follow this one
      redis.call('HSET', J.job, 'status', STATUS.queued, 'lev', id)
    else
      redis.call('HSET', J.job, 'status', STATUS.queued)
    end
    enqueue(P, mp, jid, j[2], j[3], j[6], j[7], num(j[8], 0))
    return STATUS.queued
  end
  if code == ERROR.worker_lost and num(j[4], 0) >= num(j[5], 1) then
    message = 'job lost its worker ' .. j[4] .. ' times (max_attempts)'
  end
  redis.call('HSET', J.job, 'error_code', code, 'error_message', message)
  refund_tokens(k_tenant_state(P, j[2]), num(j[10], 0), num(j[11], 0), unused, now)
  finish(J, STATUS.failed, EVENT.failed, cjson.encode({code = code, message = message}), now, maxlen)
  return STATUS.failed
end

-- Fencing: the writer must hold the job's current lease.
local function fenced(jk, fence)
  local s = redis.call('HMGET', jk, 'status', 'fence')
  return s[1] == STATUS.running and s[2] == fence
end
