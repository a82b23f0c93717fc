-- renew: extend the leases a worker holds, and tell it which were cancelled or lost.
-- KEYS[1] leases  P:m:<model>:leases
-- ARGV: 1 P, 2 lease ms, then pairs (job id, fence)
-- Returns one code per job: 0 OK, 21 STALE_LEASE (not this worker's any more),
--   23 CANCEL_REQUESTED (still leased; abort it)
local P, lease = ARGV[1], tonumber(ARGV[2])
local now = now_ms()
local out = {}
for i = 3, #ARGV, 2 do
  local jid, fence = ARGV[i], ARGV[i + 1]
  local s = redis.call('HMGET', k_job(P, jid), 'status', 'fence', 'cancel')
  if s[1] ~= STATUS.running or s[2] ~= fence then
    out[#out + 1] = 21
  else
    redis.call('ZADD', KEYS[1], 'XX', now + lease, jid)
    if s[3] == '1' then out[#out + 1] = 23 else out[#out + 1] = 0 end
  end
end
return out
