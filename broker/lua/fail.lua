-- fail: a running job failed on its worker, fenced. Retryable failures go back to the
-- queue while attempts remain (event "retry"); otherwise the job ends "failed".
-- KEYS[1] job hash  P:job:<id>
-- KEYS[2] events    P:ev:<id>
-- KEYS[3] output    P:out:<id>
-- KEYS[4] token ids P:oid:<id>
-- KEYS[5] token index P:tix:<id>
-- ARGV: 1 fence, 2 P, 3 job id, 4 error code, 5 message, 6 retry (0 no, 1 yes, 2 hand-back:
--       retry without spending the attempt, for a worker shutting down),
--       7 events maxlen, 8 channel
-- Returns {0, outcome} (outcome: queued | failed | cancelled) or {21} (STALE_LEASE)
local J = job_keys_from(KEYS, 1, ARGV[8])
if not fenced(J.job, ARGV[1]) then return {21} end
local outcome = settle(ARGV[2], J, ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6]), now_ms(), ARGV[7])
return {0, outcome}
