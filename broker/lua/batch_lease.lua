-- batch_lease: take, renew or give up the lease on driving a batch (one batcher at a time).
-- KEYS[1] lease  P:blease:<id>
-- KEYS[2] batch  P:batch:<id>
-- ARGV: 1 owner, 2 ttl ms, 3 release ('1' = give the lease up)
-- Returns {held, epoch}: held 1 when the caller holds the lease now (0: another batcher holds
--   it, or it was given up); epoch counts takeovers (+1 each time the lease is taken fresh).
local cur = redis.call('GET', KEYS[1])
local epoch = tonumber(redis.call('HGET', KEYS[2], 'epoch') or '0')
if ARGV[3] == '1' then
  if cur == ARGV[1] then redis.call('DEL', KEYS[1]) end
  return {0, epoch}
end
if cur and cur ~= ARGV[1] then return {0, epoch} end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if not cur then epoch = redis.call('HINCRBY', KEYS[2], 'epoch', 1) end
return {1, epoch}
