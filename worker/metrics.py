"""Prometheus metrics of one worker, counted where the job runs (each job once).

A worker serves them itself on ``GENQ_WORKER_METRICS_PORT`` (prometheus-client's own
HTTP server, in a thread of the worker process; 0 = off).  Every series carries
``model``; the worker's identity is the scrape target (its pod), so sum or rate
them across workers.

Counted once per job, at the terminal write this worker made (Redis accepts exactly
one per job, so a retried job is never counted twice):

- ``genq_jobs_total{model,status}``: succeeded, failed, cancelled.  Jobs that end
  without a worker are counted by whichever reaper ended them (this worker's or
  an API process's): ``failed`` (``worker_lost``) and ``expired``.
- ``genq_queue_wait_seconds``: submission to the job's first start.
- ``genq_ttft_seconds``: submission to the job's first token (an earlier attempt's
  when it had one).
- ``genq_tokens_per_second``: a succeeded job's decode rate after its first token.

Per attempt: ``genq_job_retries_total{model,reason}`` (requeued by this worker),
``genq_lost_leases_total``, generated and prompt token counters.  Live state
(running / waiting sequences, held jobs, KV cache usage, tokens/s) is set by the
event loop at every heartbeat and whenever a job starts or ends, never read from
the engine by the scrape thread (engine state is not thread-safe).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from threading import Thread
from wsgiref.simple_server import WSGIServer

import structlog
from prometheus_client import (
    GC_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
)

from broker.models import JobStatus
from worker.engine.base import EngineStats
from worker.run import JobRun

log = structlog.get_logger(__name__)

# Submission to first token spans queueing: from milliseconds to half an hour of backlog.
WAIT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)
RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


class WorkerMetrics:
    """The worker's registry (one per Worker: no global state) and its typed recorders."""

    def __init__(self, model: str, worker_id: str, engine: str = "") -> None:
        self.model = model
        self.registry = r = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=r)
        r.register(GC_COLLECTOR)
        labels = ["model"]
        Gauge("genq_worker_info", "This worker (always 1)", ["model", "worker", "engine"], registry=r).labels(
            model, worker_id, engine
        ).set(1)
        self.jobs = Counter("genq_jobs", "Jobs ended, by final status (each job once)", ["model", "status"], registry=r)
        self.retries = Counter(
            "genq_job_retries",
            "Attempts put back in the queue (worker_lost: by this reaper), by reason",
            ["model", "reason"],
            registry=r,
        )
        self.lost_leases = Counter(
            "genq_lost_leases", "Attempts whose lease went to another worker", labels, registry=r
        )
        self.preemptions = Counter(
            "genq_preemptions",
            "Runs that gave their engine slot to a more urgent job (and resumed after their tokens)",
            labels,
            registry=r,
        )
        self.generated = Counter("genq_generated_tokens", "Completion tokens generated", labels, registry=r)
        self.prompt = Counter(
            "genq_prompt_tokens", "Prompt tokens the engine processed (every attempt)", labels, registry=r
        )
        self.queue_wait = Histogram(
            "genq_queue_wait_seconds", "Submission to first start", labels, buckets=WAIT_BUCKETS, registry=r
        )
        self.ttft = Histogram(
            "genq_ttft_seconds", "Submission to first token", labels, buckets=WAIT_BUCKETS, registry=r
        )
        self.tokens_per_s = Histogram(
            "genq_tokens_per_second",
            "Completion tokens/s of one succeeded job after its first token",
            labels,
            buckets=RATE_BUCKETS,
            registry=r,
        )
        self.running = Gauge("genq_worker_running_sequences", "Sequences the engine runs", labels, registry=r)
        self.waiting = Gauge("genq_worker_waiting_sequences", "Sequences waiting in the engine", labels, registry=r)
        self.held = Gauge("genq_worker_held_jobs", "Jobs this worker holds leases for", labels, registry=r)
        self.capacity = Gauge("genq_worker_capacity_sequences", "The engine's sequence slots", labels, registry=r)
        self.kv_cache = Gauge("genq_worker_kv_cache_usage_ratio", "KV cache in use (0..1)", labels, registry=r)
        self.rate = Gauge("genq_worker_tokens_per_second", "Generated tokens/s, last heartbeat", labels, registry=r)
        self.draining = Gauge("genq_worker_draining", "1 while draining after SIGTERM", labels, registry=r)
        self.heartbeat = Gauge(
            "genq_worker_last_heartbeat_timestamp_seconds", "Unix time of the last heartbeat", labels, registry=r
        )

    # -- per job -------------------------------------------------------------
    def job_ended(self, run: JobRun, status: JobStatus) -> None:
        """This worker wrote the job's terminal state (call once, after Redis accepted it)."""
        m = self.model
        self.jobs.labels(m, status.value).inc()
        t = job_timings(run)
        if t.queue_wait_s is not None:
            self.queue_wait.labels(m).observe(t.queue_wait_s)
        if t.ttft_s is not None:
            self.ttft.labels(m).observe(t.ttft_s)
        if status is JobStatus.SUCCEEDED and t.tokens_per_s is not None:
            self.tokens_per_s.labels(m).observe(t.tokens_per_s)

    def preempted(self) -> None:
        self.preemptions.labels(self.model).inc()

    def job_reaped(self, status: JobStatus) -> None:
        """The reaper ended a job (``failed``: worker_lost; ``expired``); requeues are not counted."""
        if status in (JobStatus.FAILED, JobStatus.EXPIRED):
            self.jobs.labels(self.model, status.value).inc()

    def retried(self, reason: str) -> None:
        self.retries.labels(self.model, reason).inc()

    def lease_lost(self) -> None:
        self.lost_leases.labels(self.model).inc()

    def tokens(self, n: int) -> None:
        self.generated.labels(self.model).inc(n)

    def attempt_ended(self, run: JobRun) -> None:
        if run.prompt_tokens:
            self.prompt.labels(self.model).inc(run.prompt_tokens)

    # -- live state (from the event loop) ----------------------------------------
    def live(self, stats: EngineStats, held: int, capacity: int) -> None:
        m = self.model
        self.running.labels(m).set(stats.running)
        self.waiting.labels(m).set(stats.waiting)
        self.held.labels(m).set(held)
        self.capacity.labels(m).set(capacity)
        self.kv_cache.labels(m).set(stats.kv_cache_usage)

    def heartbeat_written(self, tokens_per_s: float, *, draining: bool) -> None:
        m = self.model
        self.rate.labels(m).set(tokens_per_s)
        self.draining.labels(m).set(1 if draining else 0)
        self.heartbeat.labels(m).set(time.time())


@dataclass(frozen=True, slots=True)
class JobTimings:
    queue_wait_s: float | None
    ttft_s: float | None
    tokens_per_s: float | None


def job_timings(run: JobRun, end: float | None = None) -> JobTimings:
    """Job-level timings: from submission (Redis clock), over every attempt so far.

    ``started_ms`` is the job's first start; ``first_token_ms`` in the claimed record is an
    earlier attempt's first token.  This attempt's own first token is placed on the same
    clock from its claim time plus the monotonic time since.
    """
    job = run.lease.job
    wait = None if job.started_ms is None else max(0, job.started_ms - job.created_ms) / 1000
    if job.first_token_ms is not None:
        ttft: float | None = max(0, job.first_token_ms - job.created_ms) / 1000
    elif run.first_token_at is not None:
        ttft = max(0.0, (run.claimed_ms - job.created_ms) / 1000 + (run.first_token_at - run.claimed_at))
    else:
        ttft = None
    rate = None
    if run.first_token_at is not None and run.tokens > 1:
        span = (end if end is not None else time.monotonic()) - run.first_token_at
        rate = (run.tokens - 1) / span if span > 0 else None
    return JobTimings(wait, ttft, rate)


@dataclass
class MetricsServer:
    """prometheus-client's HTTP server for one registry, in a daemon thread of this process."""

    metrics: WorkerMetrics
    port: int
    host: str = "0.0.0.0"
    _server: WSGIServer | None = field(default=None, init=False)
    _thread: Thread | None = field(default=None, init=False)

    def __enter__(self) -> MetricsServer:
        if self.port:
            self._server, self._thread = start_http_server(self.port, self.host, registry=self.metrics.registry)
            log.info("worker.metrics_serving", host=self.host, port=self.port)
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)
