-- batch_update: one guarded change to a batch's record and progress, all or nothing.
-- KEYS[1] batch   P:batch:<id>
-- KEYS[2] lines   P:bjobs:<id>
-- KEYS[3] segs    P:bsegs:<id>
-- KEYS[4] lease   P:blease:<id>
-- KEYS[5] active  P:batches
-- KEYS[6] webhooks due  P:webhooks
-- ARGV: 1 owner ('' = no lease needed, e.g. the API cancelling), 2 statuses the batch may be in
--   (comma separated, '' = any), 3 JSON {set = {field: string}, incr = {field: n},
--   lines = {line: job id}, unline = [line], segs = [entry], done = bool}
--   `done` (a terminal status): the batch leaves the active set and its progress keys go; a
--   batch with a `webhook` is added to the webhooks due (at most once: `wh_due` marks it).
-- Returns {code, status}: 0 OK (status after the change), 20 NOT_FOUND, 21 STALE_LEASE (the
--   lease is another batcher's), 22 ALREADY_TERMINAL (the status is not one of those allowed)
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {20, ''} end
if ARGV[1] ~= '' and redis.call('GET', KEYS[4]) ~= ARGV[1] then return {21, status} end
if ARGV[2] ~= '' and not string.find(',' .. ARGV[2] .. ',', ',' .. status .. ',', 1, true) then
  return {22, status}
end
local op = cjson.decode(ARGV[3])
if op.set then
  for f, v in pairs(op.set) do redis.call('HSET', KEYS[1], f, v) end
end
if op.incr then
  for f, n in pairs(op.incr) do redis.call('HINCRBY', KEYS[1], f, n) end
end
if op.lines then
  for line, job in pairs(op.lines) do redis.call('HSET', KEYS[2], line, job) end
end
if op.unline then
  for _, line in ipairs(op.unline) do redis.call('HDEL', KEYS[2], line) end
end
if op.segs then
  for _, s in ipairs(op.segs) do redis.call('RPUSH', KEYS[3], s) end
end
if op.done then
  redis.call('SREM', KEYS[5], redis.call('HGET', KEYS[1], 'id'))
  redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
  local b = redis.call('HMGET', KEYS[1], 'id', 'webhook', 'wh_due')
  if b[2] and b[2] ~= '' and not b[3] then
    redis.call('HSET', KEYS[1], 'wh_due', '1')
    redis.call('XADD', KEYS[6], 'MAXLEN', '~', 1000000, '*', 'k', 'batch', 'id', b[1])
  end
end
return {0, redis.call('HGET', KEYS[1], 'status')}
