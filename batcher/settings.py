"""Settings for files and batches: shared by the API (uploads, batch objects) and the batcher."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from broker.settings import BrokerSettings


def default_data_dir() -> Path:
    """genq's data folder (the one ``genq up`` keeps Redis and the key file in)."""
    return Path(os.environ.get("GENQ_DATA_DIR", Path.home() / ".local" / "share" / "genq"))


class FilesSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GENQ_", extra="ignore", env_file=".env")

    data_dir: Path = Field(default_factory=default_data_dir)  # genq's data folder (genq up: Redis, key, logs)
    # Where file contents live: a local folder or an fsspec URL (s3://bucket/prefix needs s3fs).
    # Default: <data_dir>/files.
    files_url: str | None = None
    max_file_bytes: int = Field(200 * 1024 * 1024, ge=1)  # the largest upload to /v1/files
    # A batch's completion window ("24h" is the only value the API accepts, as OpenAI's);
    # shorter here only for tests and experiments.
    batch_window_s: float = Field(24 * 3600, gt=0)

    @property
    def files_root(self) -> str:
        return self.files_url or str(self.data_dir / "files")


class WebhookSettings(BaseSettings):
    """What the API (checking webhook URLs at submission) and the batcher (delivering) share."""

    model_config = SettingsConfigDict(env_prefix="GENQ_", extra="ignore", env_file=".env")

    # Accept webhook URLs whose host is (or resolves to) a private, loopback, link-local or
    # otherwise non-public address. Off: such URLs answer 400 and are refused at delivery.
    webhooks_allow_private: bool = False


class BatcherSettings(BrokerSettings, FilesSettings, WebhookSettings):
    model_config = SettingsConfigDict(env_prefix="GENQ_", extra="ignore", env_file=".env")

    # The Redis of the batcher's arq control queue (standalone or Sentinel URL). Empty: GENQ_REDIS_URL,
    # which then must not be a Cluster (arq uses MULTI across slots; see batcher.arq_redis).
    batcher_arq_url: str | None = None
    batch_priority: int = Field(9, ge=0, le=9)  # the priority batch lines run at (9: after live traffic)
    # Lines of one batch queued or running at once (backpressure; live traffic overtakes them by
    # priority). At least the sequence slots of the workers a batch should fill, with room for
    # the engines' refill between waves (at 64, one 64-slot worker idled between waves: 0.90 of run_batch).
    batch_max_in_flight: int = Field(1024, ge=1)
    # One batcher drives a batch under a lease renewed this often; a dead batcher's batches
    # are taken over once it expires.
    batch_lease_ms: int = Field(10_000, ge=200)
    # One arq job drives a batch this long, then hands it back (other batchers may take it).
    batch_slice_s: float = Field(300.0, gt=0)
    # Finished lines are gathered this long before one segment is written and checkpointed.
    batch_flush_s: float = Field(0.2, ge=0)
    # max_tokens of a line that omits it (capped by the model's context), as the API's.
    default_max_tokens: int = Field(512, ge=1)
    # At start-up the batcher loads the tokenizers of the models registered then, in the background,
    # so a first batch does not wait for one; it starts no new load past this many seconds. 0 = off.
    batcher_preload_budget_s: float = Field(120.0, ge=0)
    # Batches one batcher process drives at once.
    batcher_max_jobs: int = Field(16, ge=1)
    # Delivery attempts of one webhook before it is given up (state `failed`).
    webhook_max_attempts: int = Field(5, ge=1, le=50)
    # Wait before a webhook's second attempt; doubled for each later one, up to GENQ_WEBHOOK_BACKOFF_MAX_S.
    webhook_backoff_s: float = Field(5.0, gt=0)
    webhook_backoff_max_s: float = Field(600.0, gt=0)  # the longest wait between two attempts
    webhook_timeout_s: float = Field(10.0, gt=0)  # one webhook attempt's time limit (connect to answer)
    json_logs: bool | None = None  # JSON log lines (None = JSON unless stderr is a terminal)
    log_level: str = "INFO"  # DEBUG, INFO, WARNING, ERROR
