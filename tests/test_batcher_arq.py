"""Where the batcher's arq control queue lives (batcher.arq_redis): the URL mapping for each
topology, and the refusal of a Redis Cluster (arq needs MULTI across slots) unless
GENQ_BATCHER_ARQ_URL names another Redis."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from batcher.arq_redis import ArqUrlError, arq_redis_settings
from batcher.settings import BatcherSettings
from batcher.worker import make_worker

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = "redis+cluster://:hunter2@10.0.0.1:7000,10.0.0.2:7000"


def test_standalone_urls_map_as_redis_py_reads_them() -> None:
    s = arq_redis_settings("rediss://u%40x:p%2Fw@db.example:6380/3?ssl_cert_reqs=none")
    assert (s.host, s.port, s.database, s.ssl, s.sentinel) == ("db.example", 6380, 3, True, False)
    assert (s.username, s.password, s.ssl_cert_reqs) == ("u@x", "p/w", "none")
    s = arq_redis_settings("redis://127.0.0.1:6379/0")
    assert (s.host, s.port, s.database, s.password, s.ssl) == ("127.0.0.1", 6379, 0, None, False)
    assert arq_redis_settings("unix:///run/redis.sock").unix_socket_path == "/run/redis.sock"


def test_sentinel_url_maps_to_arq_sentinel_support() -> None:
    s = arq_redis_settings("redis+sentinel://:pw@s1:26380,s2/genq/2")
    assert s.sentinel and s.sentinel_master == "genq"
    assert (s.host, s.database, s.password) == ([("s1", 26380), ("s2", 26379)], 2, "pw")


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://s1/genq?sentinel_password=topsecret",
        "rediss+sentinel://:topsecret@s1/genq",
    ],
)
def test_sentinel_options_arq_cannot_pass_are_refused(url: str) -> None:
    with pytest.raises(ArqUrlError, match="GENQ_BATCHER_ARQ_URL") as e:
        arq_redis_settings(url)
    assert "topsecret" not in str(e.value)


def test_cluster_needs_a_separate_arq_url() -> None:
    with pytest.raises(ArqUrlError, match="GENQ_BATCHER_ARQ_URL") as e:
        arq_redis_settings(CLUSTER)
    assert "hunter2" not in str(e.value) and "MULTI" in str(e.value)
    s = arq_redis_settings(CLUSTER, "redis://arq.internal:6379/1")
    assert (s.host, s.database, s.sentinel) == ("arq.internal", 1, False)
    with pytest.raises(ArqUrlError, match="GENQ_BATCHER_ARQ_URL is a Redis Cluster"):
        arq_redis_settings("redis://x", CLUSTER)
    with pytest.raises(ArqUrlError, match="GENQ_BATCHER_ARQ_URL"):
        arq_redis_settings(CLUSTER, "http://nope")


def test_make_worker_uses_the_arq_url() -> None:
    settings = BatcherSettings(redis_url=CLUSTER, batcher_arq_url="redis://arq.internal:6390/0")
    worker = make_worker(settings, handle_signals=False)
    assert (worker.redis_settings.host, worker.redis_settings.port) == ("arq.internal", 6390)
    with pytest.raises(ArqUrlError):
        make_worker(BatcherSettings(redis_url=CLUSTER), handle_signals=False)


@pytest.mark.parametrize(
    ("env", "said"),
    [
        ({"GENQ_REDIS_URL": CLUSTER}, "Set GENQ_BATCHER_ARQ_URL"),
        ({"GENQ_REDIS_URL": "redis://127.0.0.1:1", "GENQ_BATCHER_ARQ_URL": CLUSTER}, "GENQ_BATCHER_ARQ_URL is a"),
        ({"GENQ_REDIS_URL": "http://:hunter2@127.0.0.1:6379"}, "GENQ_REDIS_URL"),
    ],
)
def test_genq_batcher_exits_2_with_a_clear_message(env: dict[str, str], said: str) -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith("GENQ_")}
    done = subprocess.run(
        [sys.executable, "-m", "genq.cli", "batcher"],
        env={**base, **env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 2, done.stderr
    assert said in done.stderr and "Traceback" not in done.stderr
    assert "hunter2" not in done.stderr
