"""What ``genq batch`` needs besides its commands: the Files/Batches HTTP calls, the resume
state of ``genq batch run`` and the JSONL built from a plain prompts file.

The state file (``<output>.genq-batch.json``, replaced atomically) records the API URL, the
input's sha256 and the ids of the uploaded file and of the batch. It is written after the
upload and again after the batch is created, so a run killed at any point resumes: with the
batch, or with the uploaded file (and the batch created from it, found by its input file).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

import httpx

TERMINAL = ("completed", "failed", "expired", "cancelled")
RETRYABLE = (429, 502, 503, 504)  # the API restarting, Redis away, a rate limit: worth another poll
DEFAULT_URL = "http://127.0.0.1:8000"


class ApiError(Exception):
    """An HTTP error answered by the API (OpenAI error shape) or no answer at all."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.code = message, status, code

    @property
    def transient(self) -> bool:
        return self.status is None or self.status in RETRYABLE


def default_key() -> str:
    """The key ``genq up`` keeps in its data folder (as ``genq submit`` finds it)."""
    key_file = Path(os.environ.get("GENQ_DATA_DIR", Path.home() / ".local/share/genq")) / "api_key"
    return key_file.read_text().strip() if key_file.exists() else ""


def _raise_for(r: httpx.Response) -> None:
    if r.status_code < 400:
        return
    r.read()
    try:
        err = r.json()["error"]
        message, code = str(err["message"]), err.get("code")
    except (ValueError, KeyError, TypeError):
        message, code = f"HTTP {r.status_code}: {r.text[:200]}", None
    raise ApiError(message, r.status_code, code)


class BatchApi:
    """The OpenAI Files and Batches endpoints of one genq API, over httpx."""

    def __init__(self, url: str, key: str, timeout_s: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.http = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=httpx.Timeout(timeout_s)
        )

    def __enter__(self) -> BatchApi:
        return self

    def __exit__(self, *_: object) -> None:
        self.http.close()

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        try:
            r = self.http.request(method, path, **kw)
        except httpx.TransportError as e:
            raise ApiError(f"cannot reach the API at {self.url}: {e!r}") from e
        _raise_for(r)
        return r.json()

    def upload(self, data: BinaryIO, filename: str) -> str:
        files = {"file": (filename, data, "application/jsonl")}
        return str(self._call("POST", "/v1/files", files=files, data={"purpose": "batch"})["id"])

    def file_exists(self, file_id: str) -> bool:
        try:
            self._call("GET", f"/v1/files/{file_id}")
        except ApiError as e:
            if e.status == 404:
                return False
            raise
        return True

    def create(self, file_id: str, endpoint: str, metadata: dict[str, str] | None = None) -> dict[str, Any]:
        body = {"input_file_id": file_id, "endpoint": endpoint, "completion_window": "24h", "metadata": metadata}
        return dict(self._call("POST", "/v1/batches", json=body))

    def get(self, batch_id: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/v1/batches/{batch_id}"))

    def cancel(self, batch_id: str) -> dict[str, Any]:
        return dict(self._call("POST", f"/v1/batches/{batch_id}/cancel"))

    def list(self, limit: int = 20, after: str | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit, **({"after": after} if after else {})}
        return dict(self._call("GET", "/v1/batches", params=params))

    def find_by_input(self, file_id: str, pages: int = 5) -> dict[str, Any] | None:
        """The batch created from ``file_id`` (a run killed before it saved the batch id)."""
        after = None
        for _ in range(pages):
            page = self.list(100, after)
            for b in page["data"]:
                if b["input_file_id"] == file_id:
                    return dict(b)
            if not page.get("has_more") or not page["data"]:
                return None
            after = page["data"][-1]["id"]
        return None

    def download(self, file_id: str, dest: Path) -> int:
        """Stream a file's content to ``dest`` (replaced atomically); the bytes written."""
        with atomic_file(dest) as out:
            try:
                with self.http.stream("GET", f"/v1/files/{file_id}/content") as r:
                    _raise_for(r)
                    for chunk in r.iter_bytes():
                        out.write(chunk)
            except httpx.TransportError as e:
                raise ApiError(f"cannot reach the API at {self.url}: {e!r}") from e
            return out.tell()


@contextlib.contextmanager
def atomic_file(dest: Path) -> Iterator[BinaryIO]:
    """A temporary file next to ``dest`` that replaces it only once fully written and synced."""
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# -- resume state ---------------------------------------------------------------------------
@dataclass
class RunState:
    api_url: str
    input_sha256: str
    input: str
    endpoint: str
    file_id: str | None = None
    batch_id: str | None = None


def state_path(output: Path) -> Path:
    return output.with_name(output.name + ".genq-batch.json")


def errors_path(output: Path) -> Path:
    """``out.jsonl`` -> ``out.errors.jsonl`` (``out`` -> ``out.errors.jsonl``)."""
    suffix = output.suffix or ".jsonl"
    return output.with_name(output.name.removesuffix(output.suffix) + ".errors" + suffix)


def load_state(output: Path) -> RunState | None:
    try:
        raw = json.loads(state_path(output).read_text())
        return RunState(**{k: raw.get(k) for k in RunState.__dataclass_fields__})
    except FileNotFoundError:
        return None
    except (ValueError, TypeError):  # unreadable: start over rather than guess
        return None


def save_state(output: Path, state: RunState) -> None:
    with atomic_file(state_path(output)) as out:
        out.write(json.dumps(asdict(state), indent=2).encode() + b"\n")


def sha256(data: bytes | Path) -> str:
    """Of bytes, or of a file read in chunks."""
    if isinstance(data, bytes):
        return hashlib.sha256(data).hexdigest()
    h = hashlib.sha256()
    with data.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# -- input ------------------------------------------------------------------------------------
def prompts_jsonl(
    text: str, *, model: str, endpoint: str, max_tokens: int | None, temperature: float | None
) -> tuple[bytes, int]:
    """OpenAI batch JSONL from one prompt a line (custom_id = the line number; blank lines skipped)."""
    rows = []
    for n, prompt in enumerate(text.splitlines(), 1):
        if not prompt.strip():
            continue
        body: dict[str, Any] = {"model": model}
        if endpoint == "/v1/chat/completions":
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        if temperature is not None:
            body["temperature"] = temperature
        rows.append({"custom_id": str(n), "method": "POST", "url": endpoint, "body": body})
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows), len(rows)


def endpoint_of(path: Path) -> str | None:
    """The ``url`` of the first request line of a JSONL file (the batch's endpoint)."""
    with path.open("rb") as f:
        raw = next((raw for raw in f if raw.strip()), None)
    try:
        url = json.loads(raw).get("url") if raw is not None else None
    except (ValueError, AttributeError):
        return None
    return url if isinstance(url, str) else None
