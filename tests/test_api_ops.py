"""Operations: /healthz, /readyz, /metrics, request ids and the JSON access log of `genq api`."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import redis as redis_sync
from prometheus_client.parser import text_string_to_metric_families
from test_api_support import Stack, auth, make_stack  # noqa: F401 (fixture)


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_health_and_readiness(make_stack) -> None:  # noqa: F811
    stack: Stack = make_stack(worker=False)
    with httpx.Client(base_url=stack.url, timeout=10) as h:
        assert h.get("/healthz").json() == {"status": "ok"}
        r = h.get("/readyz")  # no worker yet: still ready, jobs queue (workers may scale to zero)
        assert r.status_code == 200 and r.json()["models"] == {"m": 0}
        stack.add_worker("m")  # returns once its first heartbeat is in Redis
        r = h.get("/readyz")
        assert r.status_code == 200 and r.json()["workers"] == 1 and r.json()["models"] == {"m": 1}


def test_not_ready_without_redis_and_scripts_reloaded_after_a_flush(make_stack, redis_server) -> None:  # noqa: F811
    srv = redis_server()
    stack: Stack = make_stack(worker=False, redis_url=srv.url)
    with httpx.Client(base_url=stack.url, timeout=10) as h:
        assert h.get("/readyz").status_code == 200
        redis_sync.Redis(port=srv.port).script_flush()  # as after a restart without persistence
        assert h.get("/readyz").status_code == 200
        assert all(redis_sync.Redis(port=srv.port).script_exists(*[s.sha for s in _scripts()]))
        srv.stop(kill=True)
        r = h.get("/readyz")
        assert r.status_code == 503 and r.json()["reasons"][0].startswith("redis unreachable")


def _scripts() -> list:
    from broker.scripts import NAMES, source

    return [type("S", (), {"sha": hashlib.sha1(source(n).encode()).hexdigest()}) for n in NAMES]


def test_metrics(make_stack) -> None:  # noqa: F811
    stack: Stack = make_stack(max_queued_global=1000)
    key = stack.key("acme")
    stack.call(lambda b: b.register_model("idle", 4096))
    with httpx.Client(base_url=stack.url, headers=auth(key), timeout=30) as h:
        for i in range(3):
            r = h.post(
                "/v1/chat/completions",
                json={"model": "m", "messages": [{"role": "user", "content": str(i)}], "max_tokens": 20},
            )
            assert r.status_code == 200
        for prio in ("2", "2", "7"):
            h.post("/v1/jobs", json={"model": "idle", "prompt": "x", "max_tokens": 5}, headers={"X-Priority": prio})
        h.post("/v1/jobs", json={"model": "nope", "prompt": "x"})
        text = h.get("/metrics").text
    m = samples(text)
    assert m[("genq_queue_depth", (("model", "idle"), ("priority", "2")))] == 2
    assert m[("genq_queue_depth", (("model", "idle"), ("priority", "7")))] == 1
    assert m[("genq_queue_depth", (("model", "m"), ("priority", "5")))] == 0
    assert m[("genq_queued_tokens", (("model", "idle"), ("priority", "2")))] == 2 * (5 + 8)  # prompt est. 8 + 5
    assert m[("genq_oldest_wait_seconds", (("model", "idle"),))] >= 0
    assert m[("genq_workers", (("model", "m"),))] == 1
    assert ("genq_leases", (("model", "m"),)) in m and ("genq_drain_jobs_per_second", (("model", "m"),)) in m
    # job timings are the workers' (worker.metrics), counted where the job ran, not where it was watched
    assert ("genq_ttft_seconds_count", (("model", "m"),)) not in m
    assert (
        m[("genq_http_requests_total", (("method", "POST"), ("route", "/v1/chat/completions"), ("status", "200")))] == 3
    )
    assert m[("genq_http_requests_total", (("method", "POST"), ("route", "/v1/jobs"), ("status", "404")))] == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_genq_api_command_json_access_log(settings, make_stack) -> None:  # noqa: F811
    stack: Stack = make_stack(worker=False)  # for its namespace, keys and cleanup
    key = stack.key("acme")
    port = _free_port()
    env = {
        **os.environ,
        "GENQ_REDIS_URL": settings.redis_url,
        "GENQ_QUEUE": settings.queue,
        "GENQ_MODELS": '["m"]',
        "GENQ_JSON_LOGS": "true",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "genq.cli", "api", "--port", str(port)], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:  # another process: no event to wait on
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "genq api did not start"
            time.sleep(0.05)
        r = httpx.post(
            url + "/v1/jobs",
            json={"model": "m", "prompt": "x", "max_tokens": 2},
            headers={**auth(key), "X-Request-ID": "req-123"},
        )
        assert r.status_code == 202 and r.headers["x-request-id"] == "req-123"
        generated = httpx.get(url + "/v1/jobs", headers=auth(key)).headers["x-request-id"]
        assert len(generated) == 32
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    access = [x for x in lines if x.get("event") == "request" and x.get("request_id") == "req-123"]
    assert len(access) == 1, err[-2000:]
    line = access[0]
    assert line["status"] == 202 and line["tenant"] == "acme" and line["job_id"] == r.json()["id"]
    assert line["path"] == "/v1/jobs" and line["latency_ms"] >= 0 and line["level"] == "info"
