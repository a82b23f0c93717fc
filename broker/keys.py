"""The key map: every Redis key genq uses is built here and nowhere else.

All keys of one queue namespace share the hash tag ``{<queue>}``, so one queue
lives in one Redis Cluster slot and every Lua script touches a single slot.
``P`` below is ``genq:{<queue>}``.

====================================  ======  ==========================================  ===========
key                                   type    content                                     TTL
====================================  ======  ==========================================  ===========
P:global                              hash    seq (FIFO order), fence, queued (all models) none
P:slot-guard                          -       never written: on a Cluster every script     -
                                              call names it, so none runs while the slot
                                              is resharded (broker/scripts.py GUARD)
P:apikeys                             hash    sha256(API key) -> JSON {tenant, name, admin} none
P:models                              hash    model -> JSON {max_model_len}               none
P:workers                             hash    worker id -> JSON heartbeat record          pruned by age
P:tenant:<t>                          hash    limits: rpm, rpm_burst, tpm, tpm_burst,     none
                                              max_queued, weight, priorities
P:ts:<t>                              hash    rate buckets (rq, rq_ts, tk, tk_ts), queued none
P:tjobs:<t>                           zset    job id -> created ms (list own jobs)        pruned at admit
P:idem:<t>:<key>                      string  job id for an idempotency key               result TTL
P:retry:<t>:<digest>                  string  server-side idempotency key of the latest   minutes
                                              first attempt of an OpenAI client request
P:job:<id>                            hash    the job record (see models.Job); its `ttl`  result TTL once terminal
                                              field is the result TTL set at admission
P:ev:<id>                             stream  job events from `started` on, tokens only   result TTL once terminal
                                              with logprobs (`queued` is made from the
                                              hash, tokens from P:tix: broker.events)
P:out:<id>                            string  output text so far (APPEND per write)       result TTL once terminal
P:oid:<id>                            string  output token ids so far, comma separated    result TTL once terminal
P:tix:<id>                            string  token index: per token event (seq 1, 2, ..) result TTL once terminal
                                              16 hex digits, the output's bytes and tokens
                                              after it (broker.events rebuilds the token
                                              events from it: they are not stored)
P:ch:<id>                             pubsub  live copy of each event of the job          -
P:m:<model>:stats                     hash    d<p>/k<p> depth and queued tokens per       none
                                              priority, drain window, served tokens
P:m:<model>:queued                    zset    job -> priority*1e13 + created ms            none
P:m:<model>:p<p>:tenants              zset    backlogged tenant -> virtual token counter  none
P:m:<model>:p<p>:vtc                  hash    counters of idle tenants (reset when idle)  none
P:m:<model>:p<p>:t:<t>                zset    tenant's queued jobs -> admission seq       none
P:m:<model>:leases                    zset    running job -> lease expiry ms              none
P:m:<model>:deadlines                 zset    queued, never-run job -> deadline ms        none
P:m:<model>:wake                      list    wake-up tokens for blocked claimers         trimmed
P:m:<model>:wake_u                    list    the same for work that may preempt          trimmed
                                              (priority < 9): wakes full workers
P:m:<model>:ctl                       pubsub  cancel notices (job ids) for workers        -
P:file:<id>                           hash    file record (tenant, purpose, filename,     none (DELETE)
                                              bytes, created_at, path); content lives in
                                              the file store (batcher.storage), not here
P:tfiles:<t>                          zset    file id -> created ms (list own files)      none
P:batch:<id>                          hash    batch record (status, counts, timestamps,   none
                                              errors JSON, next_line, epoch); see
                                              broker.batches
P:tbatches:<t>                        zset    batch id -> created ms (list own batches)   none
P:batches                             set     batch ids not yet terminal (batcher sweep)  none
P:bjobs:<id>                          hash    batch line -> job id (or "!" + error JSON)  removed when
                                              for lines fed but not yet collected         the batch ends
P:bsegs:<id>                          list    committed output / error segment files      removed when
                                              ("out:<name>" / "err:<name>"), in order     the batch ends
P:blease:<id>                         string  the batcher driving the batch (owner id)    lease (PX)
P:webhooks                            stream  webhooks due {k: job|batch, id}, added      entries deleted
                                              by a terminal transition (finish in         once queued
                                              _lib.lua, batch_update.lua); consumer       in arq
                                              group `batchers` (broker.webhooks)
P:whsec:<t>                           string  the tenant's webhook signing secret         none
                                              (whsec_ + base64, Standard Webhooks)
====================================  ======  ==========================================  ===========
"""

from __future__ import annotations

from dataclasses import dataclass

PRIORITIES = range(10)


@dataclass(frozen=True, slots=True)
class Keys:
    queue: str

    @property
    def prefix(self) -> str:
        return f"genq:{{{self.queue}}}"

    # -- global -------------------------------------------------------
    @property
    def global_(self) -> str:
        return f"{self.prefix}:global"

    @property
    def slot_guard(self) -> str:
        return f"{self.prefix}:slot-guard"

    @property
    def api_keys(self) -> str:
        return f"{self.prefix}:apikeys"

    @property
    def models(self) -> str:
        return f"{self.prefix}:models"

    @property
    def workers(self) -> str:
        return f"{self.prefix}:workers"

    # -- tenant -------------------------------------------------------
    def tenant(self, tenant: str) -> str:
        return f"{self.prefix}:tenant:{tenant}"

    def tenant_state(self, tenant: str) -> str:
        return f"{self.prefix}:ts:{tenant}"

    def tenant_jobs(self, tenant: str) -> str:
        return f"{self.prefix}:tjobs:{tenant}"

    def idem(self, tenant: str, key: str | None) -> str:
        return f"{self.prefix}:idem:{tenant}:{key or ''}"

    def retry_hint(self, tenant: str, digest: str) -> str:
        return f"{self.prefix}:retry:{tenant}:{digest}"

    # -- job ----------------------------------------------------------
    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def events(self, job_id: str) -> str:
        return f"{self.prefix}:ev:{job_id}"

    def output(self, job_id: str) -> str:
        return f"{self.prefix}:out:{job_id}"

    def output_ids(self, job_id: str) -> str:
        return f"{self.prefix}:oid:{job_id}"

    def token_index(self, job_id: str) -> str:
        return f"{self.prefix}:tix:{job_id}"

    def job_keys(self, job_id: str) -> list[str]:
        """A job's own keys in the order the scripts take them: job, events, output, token ids,
        token index."""
        return [
            self.job(job_id),
            self.events(job_id),
            self.output(job_id),
            self.output_ids(job_id),
            self.token_index(job_id),
        ]

    def channel(self, job_id: str) -> str:
        return f"{self.prefix}:ch:{job_id}"

    # -- model queue --------------------------------------------------
    def model_prefix(self, model: str) -> str:
        return f"{self.prefix}:m:{model}"

    def stats(self, model: str) -> str:
        return f"{self.model_prefix(model)}:stats"

    def queued(self, model: str) -> str:
        return f"{self.model_prefix(model)}:queued"

    def tenants(self, model: str, priority: int) -> str:
        return f"{self.model_prefix(model)}:p{priority}:tenants"

    def vtc(self, model: str, priority: int) -> str:
        return f"{self.model_prefix(model)}:p{priority}:vtc"

    def tenant_queue(self, model: str, priority: int, tenant: str) -> str:
        return f"{self.model_prefix(model)}:p{priority}:t:{tenant}"

    def leases(self, model: str) -> str:
        return f"{self.model_prefix(model)}:leases"

    def deadlines(self, model: str) -> str:
        return f"{self.model_prefix(model)}:deadlines"

    def wake(self, model: str) -> str:
        return f"{self.model_prefix(model)}:wake"

    def wake_urgent(self, model: str) -> str:
        return f"{self.model_prefix(model)}:wake_u"

    def control(self, model: str) -> str:
        return f"{self.model_prefix(model)}:ctl"

    # -- files and batches (broker.batches) ------------------------------
    def file(self, file_id: str) -> str:
        return f"{self.prefix}:file:{file_id}"

    def tenant_files(self, tenant: str) -> str:
        return f"{self.prefix}:tfiles:{tenant}"

    def batch(self, batch_id: str) -> str:
        return f"{self.prefix}:batch:{batch_id}"

    def tenant_batches(self, tenant: str) -> str:
        return f"{self.prefix}:tbatches:{tenant}"

    @property
    def batches_active(self) -> str:
        return f"{self.prefix}:batches"

    def batch_jobs(self, batch_id: str) -> str:
        return f"{self.prefix}:bjobs:{batch_id}"

    def batch_segments(self, batch_id: str) -> str:
        return f"{self.prefix}:bsegs:{batch_id}"

    def batch_lease(self, batch_id: str) -> str:
        return f"{self.prefix}:blease:{batch_id}"

    # -- webhooks (broker.webhooks) ----------------------------------------
    @property
    def webhooks(self) -> str:
        return f"{self.prefix}:webhooks"

    def webhook_secret(self, tenant: str) -> str:
        return f"{self.prefix}:whsec:{tenant}"
