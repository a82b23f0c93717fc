"""The job contract: what a job is, what it asks for, and every name its life is told in.

One page for the types the API, the broker (Python and Lua) and the worker share:

- :class:`Sampling` — how to sample; the API builds it once, the broker stores it typed
  inside :class:`JobInput`, the worker maps it to its engine in one function
  (``worker.engine.vllm_engine.sampling_params``). Adding a sampling parameter means a
  field here (the OpenAI bodies inherit it) and, unless vLLM spells it the same, a line
  in that mapping.
- :class:`TokenLogprob` — a generated token's logprobs as token events carry them.
- :class:`JobInput` — the request part of a job (prompt or messages, sampling, metadata),
  stored as the job hash's ``request`` field and decoded typed as ``Job.request``.
- :class:`JobSpec` — what a caller hands to ``Broker.admit``. Its ``stream`` says whether
  anyone follows the output token by token: an unstreamed job (a batch line, a
  non-streaming OpenAI call) gets its output written once, with its completion.
- :class:`JobStatus`, :class:`EventType`, :class:`JobErrorCode` — the strings stored in
  Redis and written by the Lua scripts (a test checks every literal the scripts emit is a
  member), with named sets.
- :class:`RenewResult`, :class:`FailOutcome` — typed results of broker calls.
- :class:`WebhookKind`, :class:`WebhookState`, :class:`Webhook` — a job's or a batch's
  webhook and its delivery record (see ``broker.webhooks``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.EXPIRED})
ACTIVE = frozenset({JobStatus.QUEUED, JobStatus.RUNNING})


class EventType(StrEnum):
    """The ``t`` field of a job's event stream entries (and the SSE event names)."""

    QUEUED = "queued"
    STARTED = "started"
    TOKEN = "token"
    RETRY = "retry"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


TERMINAL_EVENTS = frozenset({EventType.DONE, EventType.FAILED, EventType.CANCELLED, EventType.EXPIRED})
# Before any of these a job is waiting in a queue.
WAITING_EVENTS = frozenset({EventType.QUEUED, EventType.RETRY})


class JobErrorCode(StrEnum):
    """``error.code`` of a job that did not succeed (and the ``reason`` of a ``retry`` event)."""

    WORKER_LOST = "worker_lost"  # its lease expired: the worker died or hung
    WORKER_SHUTDOWN = "worker_shutdown"  # handed back by a stopping worker
    WORKER_ERROR = "worker_error"  # an unexpected error on the worker
    ENGINE_DEAD = "engine_dead"
    ENGINE_ABORT = "engine_abort"  # the engine aborted it without being asked to
    DEADLINE_EXCEEDED = "deadline_exceeded"  # still queued at its deadline
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
    INVALID_REQUEST = "invalid_request"


RETRYABLE = frozenset(
    {
        JobErrorCode.WORKER_LOST,
        JobErrorCode.WORKER_SHUTDOWN,
        JobErrorCode.WORKER_ERROR,
        JobErrorCode.ENGINE_DEAD,
        JobErrorCode.ENGINE_ABORT,
    }
)
# The request itself was at fault: resubmitting it unchanged cannot help.
CLIENT_ERRORS = frozenset({JobErrorCode.CONTEXT_LENGTH_EXCEEDED, JobErrorCode.INVALID_REQUEST})


class RenewResult(StrEnum):
    """Per job, what a lease renewal found."""

    OK = "ok"
    STALE = "stale"  # the lease is no longer this worker's: write nothing more
    CANCEL_REQUESTED = "cancel_requested"  # still leased, but a client cancelled it: abort


class FailOutcome(StrEnum):
    """Where a failed running job went."""

    QUEUED = "queued"  # back in its queue for another attempt
    FAILED = "failed"
    CANCELLED = "cancelled"  # its cancel had been requested


class WebhookKind(StrEnum):
    """What a webhook due is for (the ``k`` field of a ``P:webhooks`` entry)."""

    JOB = "job"
    BATCH = "batch"


class WebhookState(StrEnum):
    PENDING = "pending"  # not yet delivered; attempts (if any) failed and more will follow
    DELIVERED = "delivered"  # a receiver answered 2xx
    FAILED = "failed"  # every attempt failed, or the URL was refused at delivery


@dataclass(frozen=True, slots=True)
class Webhook:
    """A job's or batch's webhook: where it goes and how its delivery went. Each attempt is
    ``{at_ms, status_code, error, duration_ms}`` (``status_code`` null when no answer came)."""

    url: str
    state: WebhookState = WebhookState.PENDING
    attempts: tuple[dict[str, Any], ...] = ()

    @classmethod
    def from_hash(cls, h: dict[str, str]) -> Webhook | None:
        if not h.get("webhook"):
            return None
        attempts = tuple(json.loads(h["wh_attempts"])) if h.get("wh_attempts") else ()
        return cls(h["webhook"], WebhookState(h.get("wh_state") or WebhookState.PENDING), attempts)

    @property
    def finished(self) -> bool:
        return self.state is not WebhookState.PENDING

    def view(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "status": self.state.value,
            "delivered": self.state is WebhookState.DELIVERED,
            "attempts": list(self.attempts),
        }


IDEMPOTENCY_KEY = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
TENANT = re.compile(r"^[A-Za-z0-9._\-]{1,64}$")
MODEL = re.compile(r"^[A-Za-z0-9._/:\-]{1,128}$")


TokenId = Annotated[int, Field(ge=0)]
LOWEST_PRIORITY = 9  # priorities run 0 (first) .. 9; batch lines default to it (claim.lua mirrors it)
MAX_LOGPROBS = 20  # vLLM's default max_logprobs, and OpenAI's top_logprobs limit


class StructuredOutputs(BaseModel):
    """Constrained decoding (vLLM's ``StructuredOutputsParams``): exactly one constraint."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    # "json" in vLLM's request body; a field of that name would shadow BaseModel.json
    json_schema: dict[str, Any] | None = Field(None, alias="json", description="a JSON schema the output follows")
    json_object: bool | None = Field(None, description="any JSON object")
    regex: str | None = Field(None, min_length=1)
    choice: list[str] | None = Field(None, min_length=1, description="the output is one of these strings")
    grammar: str | None = Field(None, min_length=1, description="an EBNF / Lark grammar")

    @field_validator("json_object")
    @classmethod
    def _false_is_unset(cls, v: bool | None) -> bool | None:
        return v or None

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputs:
        fields = type(self).model_fields
        given = [f.alias or name for name, f in fields.items() if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of json, json_object, regex, choice, grammar (got {given or 'none'})")
        return self


class Sampling(BaseModel):
    """How to sample a job's completion: vLLM's ``SamplingParams``, field for field and with
    its defaults (and OpenAI's where the two share a name). The worker hands every field to
    the engine by name (``worker.engine.vllm_engine.sampling_params``), so a new vLLM
    parameter is a field here; the OpenAI request bodies inherit these fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, description="sample from the k most likely tokens; 0 or -1: all")
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, allow_inf_nan=False)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stop: list[str] | None = None
    stop_token_ids: list[TokenId] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0, description="generate at least this many tokens before EOS or stop")
    # How many most likely alternatives to return with each token's own logprob (0: just the
    # token's); None: no logprobs at all. Chat's `logprobs`/`top_logprobs` map onto it.
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    logit_bias: dict[TokenId, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    allowed_token_ids: list[TokenId] | None = Field(None, min_length=1)
    bad_words: list[Annotated[str, Field(min_length=1)]] | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    structured_outputs: StructuredOutputs | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and not all(v):
            raise ValueError("stop strings must not be empty")
        return v or None


SAMPLING_FIELDS = frozenset(Sampling.model_fields)


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One generated token's logprob and the ``Sampling.logprobs`` most likely tokens at its
    position (most likely first). A token event's data carries them as ``logprobs``, a list of
    :meth:`wire` items, one per token of the event, only when the job asked for logprobs."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()

    def wire(self) -> list[Any]:
        return [self.token, self.logprob, [[t, lp] for t, lp in self.top]]

    @classmethod
    def from_wire(cls, item: Sequence[Any]) -> TokenLogprob:
        token, logprob, top = item
        return cls(str(token), float(logprob), tuple((str(t), float(lp)) for t, lp in top))


def logprobs_fragment(items: Sequence[TokenLogprob]) -> str:
    """The wire items as comma-separated JSON (no brackets): the append script splices it into
    a token event's data as is, so Redis does no JSON work for it."""
    return json.dumps([t.wire() for t in items], ensure_ascii=False, separators=(",", ":"))[1:-1] if items else ""


def _nest_sampling(data: Any) -> Any:
    """Accept sampling fields flat (``temperature=...``) as well as under ``sampling``."""
    if isinstance(data, dict) and SAMPLING_FIELDS & data.keys():
        data = dict(data)
        nested = dict(data.pop("sampling", None) or {})
        for name in SAMPLING_FIELDS & data.keys():
            nested[name] = data.pop(name)
        data["sampling"] = nested
    return data


class JobInput(BaseModel):
    """The request part of a job: what to generate from and how."""

    model_config = ConfigDict(extra="ignore")

    kind: Literal["chat", "completion"] = "chat"
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    sampling: Sampling = Sampling()
    metadata: dict[str, str] | None = None
    # False: nobody follows the output token by token, so the worker writes it once with the
    # completion (plus a checkpoint every few seconds), not a delta every flush.
    stream: bool = True

    @model_validator(mode="before")
    @classmethod
    def _flat(cls, data: Any) -> Any:
        return _nest_sampling(data)

    def to_json(self) -> str:
        """Compact: defaults left out (they are filled again when decoded)."""
        return self.model_dump_json(exclude_defaults=True)


class JobSpec(BaseModel):
    """What a client asks for. Validated before anything touches Redis."""

    tenant: str = Field(pattern=TENANT.pattern)
    model: str = Field(pattern=MODEL.pattern)
    kind: Literal["chat", "completion"] = "chat"
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    sampling: Sampling = Sampling()
    max_tokens: int = Field(256, ge=1)
    priority: int = Field(5, ge=0, le=LOWEST_PRIORITY)
    # Counted by the caller (API: the model's tokenizer, or an upper-bound estimate).
    prompt_tokens: int = Field(0, ge=0)
    idempotency_key: str | None = None
    # Absolute (epoch ms): a job still queued then is expired by the reaper.
    deadline_ms: int | None = Field(None, ge=0)
    # How long the result is kept once finished; None = the broker's setting.
    result_ttl_s: int | None = Field(None, ge=1)
    metadata: dict[str, str] | None = None
    # Whether the output is streamed (a delta event every flush) or written once at completion.
    stream: bool = True
    # Where its terminal state is POSTed (checked by the caller); None = the tenant's default,
    # "" = no webhook at all (e.g. a batch's lines: the batch has the webhook).
    webhook_url: str | None = Field(None, max_length=2048)

    @model_validator(mode="before")
    @classmethod
    def _flat(cls, data: Any) -> Any:
        return _nest_sampling(data)

    @field_validator("idempotency_key")
    @classmethod
    def _idem(cls, v: str | None) -> str | None:
        if v is not None and not IDEMPOTENCY_KEY.match(v):
            raise ValueError("idempotency key must be 1-128 characters of [A-Za-z0-9._:-]")
        return v

    @model_validator(mode="after")
    def _prompt_xor_messages(self) -> JobSpec:
        if self.kind == "chat":
            if not self.messages:
                raise ValueError("a chat job needs non-empty messages")
        elif self.prompt is None:
            raise ValueError("a completion job needs a prompt")
        return self

    @property
    def input(self) -> JobInput:
        return JobInput(
            kind=self.kind,
            prompt=self.prompt,
            messages=self.messages,
            sampling=self.sampling,
            metadata=self.metadata,
            stream=self.stream,
        )

    def request_json(self) -> str:
        return self.input.to_json()

    def fingerprint_source(self) -> str:
        """What must be equal for a repeated Idempotency-Key to name the same request. How the
        output is delivered (``stream``) is not: a repeat finds the job either way. Where its
        result is sent (``webhook_url``) is, when one is named (left out otherwise, so requests
        without one keep the fingerprints they had before it counted)."""
        request = self.input.model_dump_json(exclude_defaults=True, exclude={"stream"})
        source = f"{self.model}\n{self.priority}\n{self.max_tokens}\n{request}"
        return f"{source}\nwebhook {self.webhook_url}" if self.webhook_url else source
