-- fail: a running job failed on its worker, fenced. Retryable failures go back to the
-- queue while attempts remain (event "retry"); otherwise the job ends "failed".
-- KEYS[1] job hash  P:job:<id>
-- KEYS[2] events    P:ev:<id>   (written through the shared helpers)
-- ARGV: 1 fence, 2 P, 3 job id, 4 error code, 5 message, 6 retry (0 no, 1 yes, 2 hand-back:
--       retry without spending the attempt, for a worker shutting down),
--       7 result ttl ms, 8 events maxlen
-- Returns {0, outcome} (outcome: queued | failed | cancelled) or {21} (STALE_LEASE)
if not fenced(KEYS[1], ARGV[1]) then return {21} end
local outcome = settle(ARGV[2], ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6]), now_ms(),
  tonumber(ARGV[7]), ARGV[8])
return {0, outcome}
