-- claim: lease up to N queued jobs and T tokens of one model to one worker.
-- Strict by priority (0 first); inside a priority the backlogged tenant with the
-- lowest weighted virtual token counter goes next (VTC); FIFO inside a tenant.
-- A claim stops at the first job that would exceed the token budget (never skips
-- ahead to smaller or lower-priority work); the first job is always taken.
-- A job found past its deadline is expired instead (the reaper usually got it first).
-- On a Cluster it does not run while its slot is being resharded (scripts.GUARD).
-- KEYS[1] model stats   P:m:<model>:stats
-- KEYS[2] leases        P:m:<model>:leases
-- KEYS[3] global        P:global
-- ARGV: 1 P, 2 model, 3 max jobs, 4 max tokens, 5 lease ms, 6 worker id, 7 events maxlen,
--       8 max priority (optional, default LOWEST_PRIORITY): take only jobs at this priority or
--       more urgent. A full worker claims so to preempt its least urgent runs; when it finds
--       nothing and no preempting work is queued at all, the urgent wake-up list is emptied
--       (its tokens are stale: they would only wake that worker again for nothing).
-- Returns a list of {job id, fence, v1, ..., vN, output, output_ids}: the job's fields below
-- (broker.client.CLAIMED_FIELDS, in this order; false where the hash has none) as they are after
-- the claim, then what earlier attempts emitted. Positional and only what a worker reads: a whole
-- job hash through Lua (HGETALL, then the reply) cost ~7 µs more per claimed job.
local P, model = ARGV[1], ARGV[2]
local mp = k_model(P, model)
local max_jobs, max_tok, lease = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local maxlen, worker = ARGV[7], ARGV[6]
local maxp = tonumber(ARGV[8] or LOWEST_PRIORITY)
local now = now_ms()
local now_s, until_s = int(now), int(now + lease)  -- numbers are made strings once, by int (_lib.lua)
local out, tokens, full = {}, 0, false
-- Counters a claim moves are added up here and written once at the end: jobs and tokens
-- per priority, queued jobs per tenant, the global fence and queued count, the leases.
local fence0 = num(redis.call('HGET', KEYS[3], 'fence'), 0)
local by_prio, by_tenant, leased = {}, {}, {}

for p = 0, maxp do
  if full or #out >= max_jobs then break end
  if num(redis.call('HGET', KEYS[1], 'd' .. p), 0) > 0 then
    local tz = k_tenants(mp, p)
    while #out < max_jobs do
      local top = redis.call('ZRANGE', tz, 0, 0, 'WITHSCORES')
      if #top == 0 then break end
      local tenant, vt = top[1], tonumber(top[2])
      local tq = k_tenant_queue(mp, p, tenant)
      local head = redis.call('ZRANGE', tq, 0, 1)  -- the job, and whether another one follows it
      local jid = head[1]
      if not jid then
        leave(mp, p, tenant)
      else
        local J = job_keys(P, jid)
        local j = redis.call('HMGET', J.job, 'cost', 'weight', 'deadline_ms', 'attempts', 'started_ms', 'evn',
          'seq_out', 'tenant', 'priority', 'max_attempts', 'request', 'prompt_tokens', 'max_tokens',
          'completion_tokens', 'created_ms', 'first_token_ms', 'cancel', 'lev')
        local cost = num(j[1], 0)
        local deadline = num(j[3], 0)
        if deadline > 0 and deadline < now and num(j[4], 0) == 0 then
          expire_queued(P, J, jid, now, maxlen)
        else
          if #out > 0 and tokens + cost > max_tok then full = true; break end
          redis.call('ZADD', tz, vt + cost / num(j[2], 1), tenant)
          -- unqueue, its counters deferred (the job is its tenant queue's head)
          redis.call('ZREM', tq, jid)
          if not head[2] then leave(mp, p, tenant) end
          redis.call('ZREM', k_queued(mp), jid)
          if deadline > 0 then redis.call('ZREM', k_deadlines(mp), jid) end
          local bp = by_prio[p] or {0, 0}
          by_prio[p] = {bp[1] + 1, bp[2] + cost}
          by_tenant[tenant] = (by_tenant[tenant] or 0) + 1
          local fence = fence0 + #out + 1
          local attempt, evn, s = num(j[4], 0) + 1, int(num(j[6], 0) + 1), j[7] or '0'
          local id = emit_numbered(J, maxlen, evn, EVENT.started, cjson.encode({attempt = attempt, worker = worker}), s)
          -- the job's token events are indexed (emit_token) if it has streamed none or indexed them so far
          local lev = (s == '0' or j[18]) and id or false
          if lev and not j[5] then  -- a first start (no table made)
            redis.call('HSET', J.job, 'status', STATUS.running, 'fence', int(fence), 'worker', worker,
              'attempts', int(attempt), 'evn', evn, 'started_ms', now_s, 'lev', lev)
          else
            local f = {'status', STATUS.running, 'fence', int(fence), 'worker', worker, 'attempts', int(attempt),
              'evn', evn}
            if not j[5] then f[#f + 1] = 'started_ms'; f[#f + 1] = now_s end
            if lev then f[#f + 1] = 'lev'; f[#f + 1] = lev end
            redis.call('HSET', J.job, unpack(f))
          end
          leased[#leased + 1] = until_s
          leased[#leased + 1] = jid
          -- what earlier attempts emitted: the worker resumes after it (none before a first delta)
          local streamed = s ~= '0'
          out[#out + 1] = {jid, fence, j[1], j[2], j[3], attempt, j[5] or now_s, evn, j[7], j[8], j[9], j[10], j[11],
            j[12], j[13], j[14], j[15], j[16], j[17], lev,
            streamed and (redis.call('GET', J.out) or '') or '', streamed and (redis.call('GET', J.oid) or '') or ''}
          tokens = tokens + cost
        end
      end
    end
  end
end

if #out == 0 and maxp < LOWEST_PRIORITY then
  local urgent = 0
  for p = 0, LOWEST_PRIORITY - 1 do urgent = urgent + num(redis.call('HGET', KEYS[1], 'd' .. p), 0) end
  if urgent == 0 then redis.call('DEL', k_wake_urgent(mp)) end
end

if #out > 0 then
  for p, c in pairs(by_prio) do
    redis.call('HINCRBY', KEYS[1], 'd' .. p, -c[1])
    redis.call('HINCRBY', KEYS[1], 'k' .. p, -c[2])
  end
  for tenant, n in pairs(by_tenant) do
    redis.call('HINCRBY', k_tenant_state(P, tenant), 'q', -n)
  end
  redis.call('HSET', KEYS[3], 'fence', fence0 + #out)
  redis.call('HINCRBY', KEYS[3], 'queued', -#out)
  for i = 1, #leased, 256 do  -- unpack stays far below Lua's stack limit
    redis.call('ZADD', KEYS[2], unpack(leased, i, math.min(i + 255, #leased)))
  end
end
return out
