-- backlog: a job's events from a resume point on, read at one instant: its stored events and
-- the part of its token index and output that the token events among them were made of (token
-- events are not stored: emit_token; broker.events rebuilds them).
-- KEYS[1] events P:ev:<id>, KEYS[2] output P:out:<id>, KEYS[3] token index P:tix:<id>
-- ARGV[1] the stored event to read from, inclusive ('-' = the first); ARGV[2] the token events
--   already had (their seq; -1 = as many as that stored event counted: its s); ARGV[3] max
--   stored events read
-- Returns {entries (as XRANGE's), seq, index, output}: the index from the record of token
-- event `seq` on (16 hex digits each: output bytes, tokens after it; from the first one when
-- seq is 0) and the output from the offset that record gives on.
local entries = redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', tonumber(ARGV[3]))
local seq = tonumber(ARGV[2])
if seq < 0 then
  seq = 0
  local first = entries[1]
  if first and first[1] == ARGV[1] then
    local f = first[2]
    for k = 1, #f - 1, 2 do
      if f[k] == 's' then seq = tonumber(f[k + 1]) end
    end
  end
end
if seq == 0 then
  return {entries, 0, redis.call('GET', KEYS[3]) or '', redis.call('GET', KEYS[2]) or ''}
end
local index = redis.call('GETRANGE', KEYS[3], (seq - 1) * 16, -1)
if index == '' then return {entries, seq, '', ''} end
return {entries, seq, index, redis.call('GETRANGE', KEYS[2], tonumber(string.sub(index, 1, 8), 16), -1)}
