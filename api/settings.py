"""API settings: the broker's settings plus what only the HTTP process needs (``GENQ_*``)."""

from __future__ import annotations

import math
import string

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from batcher.settings import FilesSettings, WebhookSettings
from broker.settings import BrokerSettings

MIN_KEY_CHARS = 32
MIN_KEY_BITS = 128
MIN_KEY_DISTINCT = 8
_CLASSES = (string.ascii_lowercase, string.ascii_uppercase, string.digits, string.punctuation)


def key_weakness(key: str) -> str | None:
    """Why ``key`` is too weak for a bootstrap admin key, or None. Estimated bits: length
    times log2 of the alphabet its character classes span (lower, upper, digits, symbols)."""
    alphabet = sum(len(c) for c in _CLASSES if any(ch in c for ch in key)) or 1
    bits = len(key) * math.log2(alphabet) if alphabet > 1 else 0.0
    if len(key) < MIN_KEY_CHARS:
        return f"it has {len(key)} characters; at least {MIN_KEY_CHARS} are needed"
    if len(set(key)) < MIN_KEY_DISTINCT or bits < MIN_KEY_BITS:
        return f"it is too predictable (about {bits:.0f} bits, {len(set(key))} distinct characters)"
    return None


class ApiSettings(BrokerSettings, FilesSettings, WebhookSettings):
    model_config = SettingsConfigDict(env_prefix="GENQ_", extra="ignore", env_file=".env")

    host: str = "127.0.0.1"  # the address the API listens on
    port: int = Field(8000, ge=0, le=65535)  # the port the API listens on
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
    # On SIGTERM: streams get this long to finish, then close; their jobs keep running so a
    # client can reconnect (or retry) to the restarted API. uvicorn waits 2 s more for requests.
    drain_grace_s: float = Field(8.0, ge=0)
    json_logs: bool | None = None  # JSON log lines (None = JSON unless stderr is a terminal)
    log_level: str = "INFO"  # DEBUG, INFO, WARNING, ERROR

    @field_validator("admin_key")
    @classmethod
    def _strong_admin_key(cls, v: SecretStr | None) -> SecretStr | None:
        # Checked in memory on every request and never rate limited: it must not be guessable.
        weakness = key_weakness(v.get_secret_value()) if v is not None else None
        if weakness:
            raise ValueError(
                f"GENQ_ADMIN_KEY is too weak: {weakness}. Make one with "
                "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`, or leave it unset "
                "and use `genq keys create --admin`"
            )
        return v
