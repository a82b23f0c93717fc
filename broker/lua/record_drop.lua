-- record_drop: delete a file record and its listing entry, only when the tenant owns it.
-- KEYS[1] record   P:file:<id>
-- KEYS[2] listing  P:tfiles:<t>
-- ARGV: 1 id, 2 tenant
-- Returns 1 when deleted, 0 when there was no such record of that tenant
if redis.call('HGET', KEYS[1], 'tenant') ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
