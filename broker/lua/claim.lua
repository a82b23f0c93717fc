-- claim: lease up to N queued jobs and T tokens of one model to one worker.
-- Strict by priority (0 first); inside a priority the backlogged tenant with the
-- lowest weighted virtual token counter goes next (VTC); FIFO inside a tenant.
-- A claim stops at the first job that would exceed the token budget (never skips
-- ahead to smaller or lower-priority work); the first job is always taken.
-- A job found past its deadline is expired instead (the reaper usually got it first).
-- KEYS[1] model stats   P:m:<model>:stats
-- KEYS[2] leases        P:m:<model>:leases
-- KEYS[3] global        P:global
-- ARGV: 1 P, 2 model, 3 max jobs, 4 max tokens, 5 lease ms, 6 worker id, 7 events maxlen
-- Returns a list of {job id, fence, field1, value1, ...} (the job hash after the claim,
-- plus its output and output_ids so far).
local P, model = ARGV[1], ARGV[2]
local mp = k_model(P, model)
local max_jobs, max_tok, lease = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local maxlen = ARGV[7]
local now = now_ms()
local out, tokens, full = {}, 0, false

for p = 0, 9 do
  if full or #out >= max_jobs then break end
  if num(redis.call('HGET', KEYS[1], 'd' .. p), 0) > 0 then
    local tz = k_tenants(mp, p)
    while #out < max_jobs do
      local top = redis.call('ZRANGE', tz, 0, 0, 'WITHSCORES')
      if #top == 0 then break end
      local tenant, vt = top[1], tonumber(top[2])
      local jid = redis.call('ZRANGE', k_tenant_queue(mp, p, tenant), 0, 0)[1]
      if not jid then
        leave(mp, p, tenant)
      else
        local J = job_keys(P, jid)
        local j = redis.call('HMGET', J.job, 'cost', 'weight', 'deadline_ms', 'attempts')
        local cost = num(j[1], 0)
        local deadline = num(j[3], 0)
        if deadline > 0 and deadline < now and num(j[4], 0) == 0 then
          expire_queued(P, J, jid, now, maxlen)
        else
          if #out > 0 and tokens + cost > max_tok then full = true; break end
          redis.call('ZADD', tz, vt + cost / num(j[2], 1), tenant)
          unqueue(P, mp, jid, tenant, p, cost)
          local fence = redis.call('HINCRBY', KEYS[3], 'fence', 1)
          local attempt = redis.call('HINCRBY', J.job, 'attempts', 1)
          redis.call('HSET', J.job, 'status', STATUS.running, 'fence', fence, 'worker', ARGV[6])
          redis.call('HSETNX', J.job, 'started_ms', now)
          redis.call('ZADD', KEYS[2], now + lease, jid)
          emit(J, maxlen, EVENT.started, cjson.encode({attempt = attempt, worker = ARGV[6]}))
          local rec = redis.call('HGETALL', J.job)
          -- what earlier attempts emitted: the worker resumes after it
          rec[#rec + 1] = 'output'
          rec[#rec + 1] = redis.call('GET', J.out) or ''
          rec[#rec + 1] = 'output_ids'
          rec[#rec + 1] = redis.call('GET', J.oid) or ''
          table.insert(rec, 1, tostring(fence))
          table.insert(rec, 1, jid)
          out[#out + 1] = rec
          tokens = tokens + cost
        end
      end
    end
  end
end
return out
