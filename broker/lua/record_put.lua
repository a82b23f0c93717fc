-- record_put: write a file or batch record and index it, all or nothing. One script call on
-- one slot is atomic on standalone, Sentinel and Cluster alike (redis-py's cluster client
-- refuses MULTI pipelines); all keys share the namespace's hash tag.
-- KEYS[1] record   P:file:<id> or P:batch:<id>
-- KEYS[2] listing  P:tfiles:<t> or P:tbatches:<t>
-- KEYS[3] active   P:batches (batches only: what a batcher's sweep drives)
-- ARGV: 1 id, 2 created ms (the listing's score), 3 JSON {field: string} (the record)
-- Returns 1
local rec = cjson.decode(ARGV[3])
local flat = {}
for f, v in pairs(rec) do
  flat[#flat + 1] = f
  flat[#flat + 1] = v
end
redis.call('HSET', KEYS[1], unpack(flat))
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
if KEYS[3] then redis.call('SADD', KEYS[3], ARGV[1]) end
return 1
