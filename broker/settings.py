"""Broker settings: one object per process, from ``GENQ_*`` environment variables."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from broker.models import TenantLimits

DEFAULT_MODEL = "SmolLM2-135M-Instruct"


class BrokerSettings(BaseSettings):
    # hide_input_in_errors: a bad GENQ_REDIS_URL may hold a password.
    model_config = SettingsConfigDict(env_prefix="GENQ_", extra="ignore", env_file=".env", hide_input_in_errors=True)

    # production: refuse to start on a Redis without AOF / noeviction (development: warn).
    env: Literal["development", "production"] = "development"
    # The Redis every process of one deployment shares: redis:// or rediss:// (standalone),
    # redis+sentinel://[:pw@]host:26379[,host...]/<service>[/db] (Sentinel),
    # redis+cluster://[:pw@]host:port[,host:port...] (Cluster seed nodes); see broker/connection.py.
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Replicas that must confirm an admission (Redis WAIT) before it is acknowledged, so a
    # failover cannot lose an accepted job; unconfirmed within the timeout: 503. 0 = off.
    redis_wait_replicas: int = Field(0, ge=0)
    # How long an admission waits for those replicas (GENQ_REDIS_WAIT_REPLICAS) to confirm it.
    redis_wait_timeout_ms: int = Field(500, ge=1)
    # One queue namespace = one Redis Cluster hash tag; every key of it lives in one slot.
    queue: str = Field("default", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    # Models accepted at admission even before a worker for them has registered.
    models: list[str] = [DEFAULT_MODEL]

    lease_ms: int = Field(10_000, ge=500)  # a running job's lease; renewed every third of it
    # How often expired leases are requeued and queued jobs past their deadline expired.
    reap_interval_ms: int = Field(1_000, ge=50)
    max_attempts: int = Field(3, ge=1, le=100)  # attempts per job before it fails (worker_lost)
    # How long a finished job (record, output, events) is kept; set per job at admission.
    result_ttl_s: int = Field(24 * 3600, ge=1)
    events_maxlen: int = Field(100_000, ge=100)  # events kept per job (approximate trim)

    max_queued_global: int = Field(1_000_000, ge=1)  # queued jobs of all models before 503 queue_full
    max_tokens_limit: int = Field(32_768, ge=1)  # the largest max_tokens a request may ask
    max_payload_bytes: int = Field(1_000_000, ge=1_000)  # the largest stored request (prompt + params)

    # Limits for tenants without a record of their own (0 = unlimited).
    default_rpm: int = 0  # requests per minute
    default_rpm_burst: int = 0  # requests allowed at once (0 = the per-minute figure)
    default_tpm: int = 0  # tokens (prompt + max_tokens) per minute
    default_tpm_burst: int = 0  # tokens allowed at once (0 = the per-minute figure)
    default_max_queued: int = 0  # queued jobs per tenant
    default_weight: float = 1.0  # share of capacity under contention (fairness weight)

    @field_validator("redis_url")
    @classmethod
    def _usable_url(cls, url: str) -> str:
        from broker.connection import parse_redis_url

        parse_redis_url(url)  # BadRedisUrl is a ValueError: pydantic reports it
        return url

    def default_limits(self) -> TenantLimits:
        """The limits a tenant without a record of its own runs under."""
        return TenantLimits(
            rpm=self.default_rpm,
            rpm_burst=self.default_rpm_burst,
            tpm=self.default_tpm,
            tpm_burst=self.default_tpm_burst,
            max_queued=self.default_max_queued,
            weight=self.default_weight,
        )

    @property
    def result_ttl_ms(self) -> int:
        return self.result_ttl_s * 1000
