"""Where the batcher's arq control queue lives: arq's ``RedisSettings`` from genq's Redis URLs.

arq 0.28 runs on a standalone Redis or behind Sentinel (its own ``sentinel=True`` support),
never on a Redis Cluster: it enqueues, dequeues and finishes jobs with MULTI transactions
over keys of different slots (its queue, ``arq:job:<id>``, ``arq:in-progress:<id>``...). So
the control queue goes to

- ``GENQ_BATCHER_ARQ_URL`` when it is set (a standalone or Sentinel URL);
- else ``GENQ_REDIS_URL``, unless that is a Cluster: then the batcher refuses to start.

Only arq's own keys go there (the queued ``drive_batch`` and ``deliver_webhook`` jobs and their
bookkeeping); batches, files, jobs and the webhooks due stay on ``GENQ_REDIS_URL``. Run that
Redis with AOF too: a ``drive_batch`` it loses is enqueued again by the next sweep, but a
webhook delivery, once handed to arq, lives only there.

What arq 0.28 cannot carry is refused rather than dropped: it opens the sentinels without
credentials and without TLS (its ``create_pool`` passes no ``sentinel_kwargs``), so a Sentinel
URL with ``sentinel_password`` / ``sentinel_username`` or TLS options must name a plain
sentinel setup in ``GENQ_BATCHER_ARQ_URL`` instead.
"""

from __future__ import annotations

import dataclasses
from urllib.parse import parse_qs, unquote, urlsplit

from arq.connections import RedisSettings

from broker.connection import parse_redis_url
from broker.errors import BadRedisUrl


class ArqUrlError(ValueError):
    """No Redis arq can run on: the message says which setting to change (no URL echoed)."""


def arq_url(redis_url: str, batcher_arq_url: str | None) -> tuple[str, str]:
    """The URL the control queue uses and the setting it came from."""
    if batcher_arq_url:
        return batcher_arq_url, "GENQ_BATCHER_ARQ_URL"
    return redis_url, "GENQ_REDIS_URL"


def arq_redis_settings(redis_url: str, batcher_arq_url: str | None = None) -> RedisSettings:
    """arq's settings for the batcher's control queue; raises :class:`ArqUrlError`."""
    url, name = arq_url(redis_url, batcher_arq_url)
    try:
        target = parse_redis_url(url)
    except BadRedisUrl as e:
        raise ArqUrlError(f"{name}: {e.problem}") from None
    if target.kind == "cluster":
        if name == "GENQ_REDIS_URL":
            raise ArqUrlError(
                "GENQ_REDIS_URL is a Redis Cluster, and arq (the batcher's control queue) cannot run on one:"
                " it uses MULTI transactions across keys of different slots. Set GENQ_BATCHER_ARQ_URL to a"
                " standalone (redis://) or Sentinel (redis+sentinel://) Redis for it; batches and files"
                " stay on the Cluster."
            )
        raise ArqUrlError(
            "GENQ_BATCHER_ARQ_URL is a Redis Cluster URL; arq needs a standalone (redis://) or Sentinel"
            " (redis+sentinel://) Redis."
        )
    if target.kind == "sentinel":
        if target.tls or target.options:
            raise ArqUrlError(
                f"{name}: arq 0.28 reaches sentinels without credentials or TLS, so it cannot use this"
                " Sentinel URL (sentinel_password, sentinel_username, TLS options or rediss+sentinel://)."
                " Set GENQ_BATCHER_ARQ_URL to a standalone Redis, or to a Sentinel setup without them."
            )
        return RedisSettings(
            host=list(target.nodes),
            sentinel=True,
            sentinel_master=target.service,
            database=target.db,
            username=target.username,
            password=target.password,
        )
    settings = RedisSettings.from_dsn(url)
    parts = urlsplit(url)
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    return dataclasses.replace(
        settings,
        # arq's from_dsn keeps them percent-encoded; redis-py (the broker's client) decodes them.
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        ssl_cert_reqs=query.get("ssl_cert_reqs", settings.ssl_cert_reqs),
        ssl_ca_certs=query.get("ssl_ca_certs", settings.ssl_ca_certs),
    )
