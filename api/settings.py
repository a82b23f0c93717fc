"""API settings: the broker's settings plus what only the HTTP process needs (``GENQ_*``)."""

from __future__ import annotations

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from broker.settings import BrokerSettings


class ApiSettings(BrokerSettings):
    model_config = SettingsConfigDict(env_prefix="GENQ_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    # A bootstrap admin key, checked in memory (never written to Redis). Optional:
    # admin keys can also be created with `genq keys create --admin`.
    admin_key: SecretStr | None = None
    # Request bodies above this answer 413 before any parsing.
    max_body_bytes: int = Field(2_000_000, ge=1_024)
    # A request head (request line + headers) above this answers 431 while it arrives.
    max_header_bytes: int = Field(64 * 1024, ge=8 * 1024)
    # Open SSE streams (native events and OpenAI streams) per tenant, per API process.
    sse_per_tenant: int = Field(64, ge=1)
    # An SSE stream silent for this long gets a comment line, so proxies keep it open. Never
    # while events flow: some clients (vLLM's `bench serve`) lose the messages after a comment.
    keepalive_s: float = Field(15.0, gt=0)
    # While a followed job is queued, a `position` event this often.
    position_interval_s: float = Field(2.0, gt=0)
    # max_tokens when a request omits it (capped by the model's context like vLLM).
    default_max_tokens: int = Field(512, ge=1)
    # A non-streamed OpenAI request waits at most this long for its job, then cancels it.
    sync_timeout_s: float = Field(600.0, gt=0)
    # A worker counts as live when its heartbeat is younger than this (readiness, /v1/models).
    worker_max_age_ms: int = Field(15_000, ge=100)
    # An OpenAI call for a model with no live worker waits this long for one, then answers
    # 503 `no_worker` (its job cancelled) instead of waiting `sync_timeout_s`.
    no_worker_grace_s: float = Field(10.0, ge=0)
    # An OpenAI request with an `Idempotency-Key` whose client went away keeps its job this
    # long before cancelling it, so a retry with the same key re-attaches to it.
    reattach_grace_s: float = Field(10.0, ge=0)
    json_logs: bool | None = None
    log_level: str = "INFO"
