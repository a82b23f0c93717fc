-- Shared helpers, prepended to every script when it is loaded (Redis 6.2 has no
-- FUNCTION LOAD). Key names below are derived from prefixes passed in ARGV; every
-- such key carries the queue's hash tag, so it lives in the same Cluster slot as KEYS.

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function num(v, default)
  if v == false or v == nil or v == '' then return default end
  return tonumber(v)
end

-- Append one event to the job's stream and publish "<id>\n<n>\n<type>\n<data>" on its
-- channel; n counts the job's events (1, 2, ...) so a live follower can tell a gap.
local function emit(jk, ev_key, channel, maxlen, etype, data)
  local n = redis.call('HINCRBY', jk, 'evn', 1)
  local id = redis.call('XADD', ev_key, 'MAXLEN', '~', maxlen, '*', 'n', n, 't', etype, 'd', data)
  redis.call('PUBLISH', channel, id .. '\n' .. n .. '\n' .. etype .. '\n' .. data)
  return id
end

-- Token bucket: current level (refilled to now) of field f in hash state.
local function bucket_level(state, f, per_min, burst, now)
  local v = redis.call('HMGET', state, f, f .. '_ts')
  local have = num(v[1], burst)
  local ts = num(v[2], now)
  local level = have + (now - ts) * per_min / 60000
  if level > burst then level = burst end
  return level
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
  local tz = mp .. ':p' .. prio .. ':tenants'
  local v = redis.call('ZSCORE', tz, tenant)
  redis.call('ZREM', tz, tenant)
  local vk = mp .. ':p' .. prio .. ':vtc'
  if redis.call('ZCARD', tz) == 0 then
    redis.call('DEL', vk)
  elseif v then
    redis.call('HSET', vk, tenant, v)
  end
end

-- Put a job (back) into its tenant's FIFO at its priority; a tenant that becomes
-- backlogged starts at max(own counter, lowest backlogged counter) (VTC "lift").
local function enqueue(P, mp, jid, tenant, prio, seq, pscore, cost)
  local tq = mp .. ':p' .. prio .. ':t:' .. tenant
  local tz = mp .. ':p' .. prio .. ':tenants'
  redis.call('ZADD', tq, seq, jid)
  if not redis.call('ZSCORE', tz, tenant) then
    local v = num(redis.call('HGET', mp .. ':p' .. prio .. ':vtc', tenant), 0)
    local low = redis.call('ZRANGE', tz, 0, 0, 'WITHSCORES')
    if low[2] and tonumber(low[2]) > v then v = tonumber(low[2]) end
    redis.call('ZADD', tz, v, tenant)
  end
  redis.call('ZADD', mp .. ':queued', pscore, jid)
  redis.call('HINCRBY', mp .. ':stats', 'd' .. prio, 1)
  redis.call('HINCRBY', mp .. ':stats', 'k' .. prio, cost)
  redis.call('HINCRBY', P .. ':ts:' .. tenant, 'q', 1)
  redis.call('HINCRBY', P .. ':global', 'queued', 1)
  local wake = mp .. ':wake'
  redis.call('RPUSH', wake, 1)
  redis.call('LTRIM', wake, -64, -1)
end

-- Take a queued job out of the queue structures (claim or cancel).
local function unqueue(P, mp, jid, tenant, prio, cost)
  local tq = mp .. ':p' .. prio .. ':t:' .. tenant
  if redis.call('ZREM', tq, jid) == 0 then return false end
  if redis.call('ZCARD', tq) == 0 then leave(mp, prio, tenant) end
  redis.call('ZREM', mp .. ':queued', jid)
  redis.call('HINCRBY', mp .. ':stats', 'd' .. prio, -1)
  redis.call('HINCRBY', mp .. ':stats', 'k' .. prio, -cost)
  redis.call('HINCRBY', P .. ':ts:' .. tenant, 'q', -1)
  redis.call('HINCRBY', P .. ':global', 'queued', -1)
  return true
end

-- Move a job to a terminal status, announce it, and start its TTL.
local function finish(P, jid, status, etype, data, now, ttl, maxlen)
  local jk = P .. ':job:' .. jid
  redis.call('HSET', jk, 'status', status, 'finished_ms', now)
  emit(jk, P .. ':ev:' .. jid, P .. ':ch:' .. jid, maxlen, etype, data)
  redis.call('PEXPIRE', jk, ttl)
  redis.call('PEXPIRE', P .. ':ev:' .. jid, ttl)
  redis.call('PEXPIRE', P .. ':out:' .. jid, ttl)
  redis.call('PEXPIRE', P .. ':oid:' .. jid, ttl)
end

-- Append one delta's text and token ids; O(1) in the output's length.
local function write_output(out_key, ids_key, text, ids)
  if text ~= '' then redis.call('APPEND', out_key, text) end
  if ids ~= '' then redis.call('APPEND', ids_key, ',' .. ids) end
end

-- Completed-job drain rate over a short window (jobs/s and tokens/s).
local function drained(stats, now, ntok)
  local w = redis.call('HMGET', stats, 'w_start', 'w_jobs', 'w_tok')
  local ws = num(w[1], now)
  if w[1] == false then redis.call('HSET', stats, 'w_start', now) end
  local span = now - ws
  if span >= 2000 then
    local jobs = num(w[2], 0) + 1
    local tok = num(w[3], 0) + ntok
    redis.call('HSET', stats, 'dr', jobs * 1000 / span, 'dt', tok * 1000 / span,
      'w_start', now, 'w_jobs', 0, 'w_tok', 0)
  else
    redis.call('HINCRBY', stats, 'w_jobs', 1)
    redis.call('HINCRBY', stats, 'w_tok', ntok)
  end
end

-- A running job lost its worker or failed: requeue it (attempts left), else fail it.
-- A job whose cancel was requested is cancelled instead.
local function settle(P, jid, code, message, retry, now, ttl, maxlen)
  local jk = P .. ':job:' .. jid
  local j = redis.call('HMGET', jk, 'model', 'tenant', 'priority', 'attempts', 'max_attempts',
    'seq', 'pscore', 'cost', 'cancel', 'tpm', 'tpm_burst', 'max_tokens', 'completion_tokens')
  local mp = P .. ':m:' .. j[1]
  redis.call('ZREM', mp .. ':leases', jid)
  redis.call('HDEL', jk, 'worker')
  local unused = num(j[12], 0) - num(j[13], 0)
  if j[9] == '1' then
    refund_tokens(P .. ':ts:' .. j[2], num(j[10], 0), num(j[11], 0), unused, now)
    finish(P, jid, 'cancelled', 'cancelled', cjson.encode({reason = 'cancelled'}), now, ttl, maxlen)
    return 'cancelled'
  end
  if retry == 2 then  -- handed back unstarted-by-fault (worker shutdown): the attempt is not spent
    j[4] = redis.call('HINCRBY', jk, 'attempts', -1)
  end
  if retry >= 1 and num(j[4], 0) < num(j[5], 1) then
    redis.call('HSET', jk, 'status', 'queued')
    emit(jk, P .. ':ev:' .. jid, P .. ':ch:' .. jid, maxlen, 'retry',
      cjson.encode({attempt = num(j[4], 0), reason = code, message = message}))
    enqueue(P, mp, jid, j[2], j[3], j[6], j[7], num(j[8], 0))
    return 'queued'
  end
  if code == 'worker_lost' and num(j[4], 0) >= num(j[5], 1) then
    message = 'job lost its worker ' .. j[4] .. ' times (max_attempts)'
  end
  redis.call('HSET', jk, 'error_code', code, 'error_message', message)
  refund_tokens(P .. ':ts:' .. j[2], num(j[10], 0), num(j[11], 0), unused, now)
  finish(P, jid, 'failed', 'failed', cjson.encode({code = code, message = message}), now, ttl, maxlen)
  return 'failed'
end

-- Fencing: the writer must hold the job's current lease.
local function fenced(jk, fence)
  local s = redis.call('HMGET', jk, 'status', 'fence')
  return s[1] == 'running' and s[2] == fence
end
