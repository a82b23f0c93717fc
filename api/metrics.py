"""Prometheus metrics of one API process, on a registry of its own (no global state).

Two kinds, aggregated differently across API replicas:

- Queue gauges (``genq_queue_depth``, ``genq_queued_tokens``, ``genq_oldest_wait_seconds``,
  ``genq_drain_*``, ``genq_leases``, ``genq_workers``) are *global* values read from Redis
  at scrape time: every replica reports the same figure, so aggregate them with ``max``
  (never ``sum``).  The /metrics handler takes an async snapshot, then the collector renders it.
- Request metrics (HTTP requests and latency, rejections by reason, retries its followers
  saw) are this process's own: ``sum`` them.

Job outcomes and job timings (``genq_jobs_total``, TTFT, queue wait, tokens/s) are counted
where the job runs, by the workers (:mod:`worker.metrics`), each job once; an API process
only counts the jobs its reaper ends (``genq_jobs_total{status="failed"|"expired"}``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator

from prometheus_client import GC_COLLECTOR, CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from broker.models import JobStatus, QueueStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class _QueueCollector(Collector):
    def __init__(self) -> None:
        self.snapshot: list[QueueStats] = []
        self.workers: dict[str, int] = {}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily("genq_queue_depth", "Queued jobs", labels=["model", "priority"])
        tokens = GaugeMetricFamily("genq_queued_tokens", "Reserved tokens of queued jobs", labels=["model", "priority"])
        oldest = GaugeMetricFamily("genq_oldest_wait_seconds", "Age of the oldest queued job", labels=["model"])
        drain = GaugeMetricFamily("genq_drain_jobs_per_second", "Measured completion rate", labels=["model"])
        drain_t = GaugeMetricFamily("genq_drain_tokens_per_second", "Measured completion tokens/s", labels=["model"])
        leases = GaugeMetricFamily("genq_leases", "Running jobs (held leases)", labels=["model"])
        workers = GaugeMetricFamily("genq_workers", "Live workers", labels=["model"])
        for s in self.snapshot:
            for p, n in s.depth.items():
                depth.add_metric([s.model, str(p)], n)
                tokens.add_metric([s.model, str(p)], s.queued_tokens.get(p, 0))
            oldest.add_metric([s.model], s.oldest_wait_ms / 1000)
            drain.add_metric([s.model], s.drain_jobs_per_s)
            drain_t.add_metric([s.model], s.drain_tokens_per_s)
            leases.add_metric([s.model], s.running)
            workers.add_metric([s.model], self.workers.get(s.model, 0))
        yield from (depth, tokens, oldest, drain, drain_t, leases, workers)


class ApiMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.queues = _QueueCollector()
        r.register(self.queues)
        ProcessCollector(registry=r)
        r.register(GC_COLLECTOR)
        self.jobs = Counter(
            "genq_jobs", "Jobs this process's reaper ended (worker_lost, expired)", ["model", "status"], registry=r
        )
        self.retries = Counter("genq_retries", "Retry events seen by followers in this process", ["model"], registry=r)
        self.rejections = Counter("genq_rejections", "Refused requests by reason", ["reason"], registry=r)
        self.requests = Counter("genq_http_requests", "HTTP requests", ["method", "route", "status"], registry=r)
        self.latency = Histogram(
            "genq_http_request_duration_seconds",
            "HTTP request latency (streams: until closed)",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._seen: OrderedDict[str, None] = OrderedDict()  # events already counted (bounded)

    def _first_time(self, key: str) -> bool:
        if key in self._seen:
            return False
        self._seen[key] = None
        if len(self._seen) > 50_000:
            self._seen.popitem(last=False)
        return True

    def job_reaped(self, model: str, status: JobStatus) -> None:
        """This process's reaper ended a job (requeues are not an outcome)."""
        if status in (JobStatus.FAILED, JobStatus.EXPIRED):
            self.jobs.labels(model, status.value).inc()

    def retry_seen(self, model: str, job_id: str, event_id: str) -> None:
        if self._first_time(f"retry:{job_id}:{event_id}"):
            self.retries.labels(model).inc()

    def rejected(self, reason: str) -> None:
        self.rejections.labels(reason).inc()

    def render(self, snapshot: Iterable[QueueStats], workers: dict[str, int]) -> bytes:
        self.queues.snapshot, self.queues.workers = list(snapshot), workers
        return generate_latest(self.registry)
