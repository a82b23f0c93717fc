"""The OpenAI batch JSONL format: input lines in, output and error lines out.

Input, one JSON object a line: ``{"custom_id", "method": "POST", "url", "body"}``, the
body being what the endpoint takes. Every line is checked before anything runs; a file
with problems fails its batch with one error per problem (with its line number).

Output lines have OpenAI's shape: ``{"id", "custom_id", "response": {"status_code",
"request_id", "body"}, "error"}`` — ``response`` for a request that ran (its body the
completion, or the OpenAI error it answered), ``error`` (``batch_expired``,
``batch_cancelled``) for one that never finished.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from api.errors import ApiError, from_broker, from_job_end
from api.openai_schemas import (
    ChatCompletionRequest,
    ChatFormatter,
    CompletionFormatter,
    CompletionRequest,
    usage_dict,
)
from api.service import Submission
from api.tokens import TokenCounter
from broker import errors as be
from broker.contract import EventType, JobStatus, TokenLogprob
from broker.models import Job, JobSpec

ENDPOINTS: dict[str, tuple[type[ChatCompletionRequest] | type[CompletionRequest], type]] = {
    "/v1/chat/completions": (ChatCompletionRequest, ChatFormatter),
    "/v1/completions": (CompletionRequest, CompletionFormatter),
}
MAX_ERRORS = 100  # listed per batch; the message of the last says how many more


@dataclass(slots=True)
class Line:
    n: int  # line number in the file (1-based)
    custom_id: str
    kind: str  # chat | completion
    sub: Submission


@dataclass(slots=True)
class LineError:
    code: str
    message: str
    line: int | None = None
    param: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "line": self.line, "param": self.param}


def _check(n: int, raw: bytes, endpoint: str, models: set[str]) -> Line | LineError:
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        return LineError("invalid_json_line", f"Line {n} is not valid JSON: {e}.", n)
    if not isinstance(obj, dict):
        return LineError("invalid_json_line", f"Line {n} is not a JSON object.", n)
    cid = obj.get("custom_id")
    if not isinstance(cid, str) or not cid:
        return LineError("missing_required_parameter", f"Line {n} has no custom_id (a string).", n, "custom_id")
    if obj.get("method", "POST") != "POST":
        return LineError("invalid_method", f"Line {n}: method must be POST.", n, "method")
    url = obj.get("url")
    if url not in ENDPOINTS:
        return LineError(
            "invalid_url", f"Line {n}: url {str(url)[:80]!r} is not supported; use {' or '.join(ENDPOINTS)}.", n, "url"
        )
    if url != endpoint:
        return LineError("invalid_url", f"Line {n}: url {url} differs from the batch's endpoint {endpoint}.", n, "url")
    body = obj.get("body")
    if not isinstance(body, dict):
        return LineError("invalid_request", f"Line {n}: body must be a JSON object.", n, "body")
    if not body.get("model"):
        return LineError("missing_required_parameter", f"Line {n}: body.model is required.", n, "body.model")
    if body.get("stream"):
        return LineError("invalid_request", f"Line {n}: a batch request cannot stream.", n, "body.stream")
    schema, _ = ENDPOINTS[endpoint]
    try:
        request = schema.model_validate(body)
        sub = request.submission(9)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        return LineError("invalid_request", f"Line {n}: {first['msg']} (at body.{where}).", n, f"body.{where}")
    except ApiError as e:
        return LineError(
            e.code or "invalid_request", f"Line {n}: {e.message}", n, f"body.{e.param}" if e.param else None
        )
    if request.choices > 1:  # a line is one job; the OpenAI API gives each choice a job of its own
        return LineError("unsupported_value", f"Line {n}: n > 1 is not supported in a batch.", n, "body.n")
    if sub.model not in models:
        return LineError("model_not_found", f"Line {n}: the model `{sub.model[:128]}` does not exist.", n, "body.model")
    return Line(n, cid, "chat" if endpoint == "/v1/chat/completions" else "completion", sub)


def parse(data: bytes, endpoint: str, models: set[str]) -> tuple[list[Line], list[LineError]]:
    """Every request of a batch file, or the problems that stop it (empty when it is good)."""
    lines: list[Line] = []
    problems: list[LineError] = []
    seen: dict[str, int] = {}
    for n, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        got = _check(n, raw, endpoint, models)
        if isinstance(got, Line) and got.custom_id in seen:
            got = LineError(
                "duplicate_custom_id",
                f"Line {n}: custom_id {got.custom_id[:80]!r} was already used on line {seen[got.custom_id]}.",
                n,
                "custom_id",
            )
        if isinstance(got, LineError):
            problems.append(got)
        else:
            seen[got.custom_id] = n
            lines.append(got)
    if not lines and not problems:
        problems.append(LineError("empty_file", "The input file has no requests."))
    if len(problems) > MAX_ERRORS:
        extra = len(problems) - MAX_ERRORS + 1
        problems = [*problems[: MAX_ERRORS - 1], LineError("too_many_errors", f"... and {extra} more problems.")]
    return lines, problems


async def to_spec(
    line: Line,
    *,
    tenant: str,
    batch_id: str,
    priority: int,
    info: dict[str, Any],
    tokens: TokenCounter,
    default_max_tokens: int,
    max_tokens_limit: int,
) -> JobSpec:
    """The job of one line; its idempotency key (batch id + line) makes a replayed admission a no-op."""
    sub = line.sub
    max_len = int(info.get("max_model_len") or 0)
    prompt_tokens = await tokens.count(info, sub.prompt, sub.messages)
    if max_len and prompt_tokens >= max_len:
        raise be.ContextTooLong(max_len, prompt_tokens, 0)
    max_tokens = sub.max_tokens
    if max_tokens is None:  # as the API does: what the context leaves, capped by a default
        max_tokens = min(default_max_tokens, max_tokens_limit)
        if max_len:
            max_tokens = min(max_tokens, max_len - prompt_tokens)
    return JobSpec(
        tenant=tenant,
        model=sub.model,
        kind=line.kind,
        prompt=sub.prompt,
        messages=sub.messages,
        max_tokens=max_tokens,
        sampling=sub.sampling,
        priority=priority,
        prompt_tokens=prompt_tokens,
        idempotency_key=f"{batch_id}:{line.n}",
        metadata={**(sub.metadata or {}), "batch_id": batch_id},
        stream=False,  # nobody follows a batch line token by token: its output is written once
        webhook_url="",  # the batch's webhook says when it ends, not each line's
    )


def request_id(batch_id: str, line: Line) -> str:
    return f"batch_req_{batch_id.removeprefix('batch_')}_{line.n}"


def response_line(batch_id: str, line: Line, status_code: int, body: dict[str, Any], job_id: str) -> dict[str, Any]:
    return {
        "id": request_id(batch_id, line),
        "custom_id": line.custom_id,
        "response": {"status_code": status_code, "request_id": job_id, "body": body},
        "error": None,
    }


def refused_line(batch_id: str, line: Line, e: be.BrokerError) -> dict[str, Any]:
    """A line admission refused for good (e.g. too long for the model)."""
    err = from_broker(e, line.kind)
    return response_line(batch_id, line, err.status, err.body(), "")


def never_ran_line(batch_id: str, line: Line, code: str) -> dict[str, Any]:
    """A line the batch did not finish: ``batch_expired`` or ``batch_cancelled``."""
    why = "before the batch's completion window ended" if code == "batch_expired" else "before the batch was cancelled"
    return {
        "id": request_id(batch_id, line),
        "custom_id": line.custom_id,
        "response": None,
        "error": {"code": code, "message": f"This request could not be executed {why}."},
    }


_END_EVENT = {JobStatus.FAILED: EventType.FAILED, JobStatus.CANCELLED: EventType.CANCELLED}


def job_line(
    batch_id: str, line: Line, job: Job, endpoint: str, logprobs: list[TokenLogprob] | None = None
) -> tuple[bool, dict[str, Any]]:
    """(succeeded, the output line) of a finished job (``logprobs``: the job's, if it asked)."""
    if job.status is JobStatus.SUCCEEDED:
        _, fmt_cls = ENDPOINTS[endpoint]
        created = (job.finished_ms or job.created_ms) // 1000
        fmt = fmt_cls(job.id, job.model, created=created)
        usage = usage_dict(job.prompt_tokens, job.completion_tokens)
        body = fmt.full([(job.output, job.finish_reason, logprobs)], usage)
        return True, response_line(batch_id, line, 200, body, job.id)
    err = from_job_end(_END_EVENT.get(job.status, EventType.EXPIRED), job.error or {})
    return False, response_line(batch_id, line, err.status, err.body(), job.id)


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in rows)


def ceil_s(ms: int) -> int:
    return math.ceil(ms / 1000)
