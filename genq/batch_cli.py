"""``genq batch``: OpenAI batches from scripts — run (resumable), submit, status, list, cancel, download.

``genq batch run in.jsonl -o out.jsonl`` uploads, creates, follows and downloads; its state
file (``out.jsonl.genq-batch.json``) makes the same command, run again after Ctrl-C, a crash
or a reboot, follow the same batch. Exit codes: 0 completed, 1 the batch failed, expired or
was cancelled, 3 the API answered an error or could not be reached, 130 interrupted.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, BinaryIO

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn
from rich.table import Table

from genq import batch_api as ba

app = typer.Typer(no_args_is_help=True, add_completion=False, help="OpenAI batches: run, submit, status, list, ...")
err = Console(stderr=True, highlight=False, soft_wrap=True)

EXIT_NOT_COMPLETED, EXIT_API, EXIT_INTERRUPTED = 1, 3, 130
GIVE_UP_S = 120.0  # how long `run` keeps polling an API that does not answer
ENDPOINTS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}

Url = Annotated[str, typer.Option("--url", envvar="GENQ_URL", help="The genq API.")]
Key = Annotated[
    str | None, typer.Option("--key", envvar="GENQ_API_KEY", help="API key (default: the one `genq up` keeps).")
]
Input = Annotated[Path | None, typer.Argument(help="OpenAI batch JSONL (or use --prompts).", show_default=False)]
Prompts = Annotated[Path | None, typer.Option("--prompts", help="One plain prompt a line instead of JSONL.")]
Endpoint = Annotated[str | None, typer.Option(help="chat or completions (default: the input's first url, else chat).")]
Model = Annotated[str | None, typer.Option(help="With --prompts: the model (default: genq's default model).")]
MaxTokens = Annotated[int | None, typer.Option(help="With --prompts: max_tokens of each request.")]
Temperature = Annotated[float | None, typer.Option(help="With --prompts: temperature of each request.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print the API's JSON.")]


def say(message: str) -> None:
    err.print(message)


@contextlib.contextmanager
def api_errors() -> Iterator[None]:
    try:
        yield
    except ba.ApiError as e:
        where = f" (HTTP {e.status}{', ' + e.code if e.code else ''})" if e.status else ""
        say(f"[red]error[/]{escape(where)}: {escape(e.message)}")
        raise typer.Exit(EXIT_API) from None


def connect(url: str, key: str | None) -> ba.BatchApi:
    return ba.BatchApi(url, key if key is not None else ba.default_key())


# -- input ------------------------------------------------------------------------------------
@dataclass
class Prepared:
    sha256: str
    filename: str
    endpoint: str
    open: Callable[[], BinaryIO]


def _endpoint(value: str | None) -> str | None:
    if value is None or value in ENDPOINTS.values():
        return value
    if value in ENDPOINTS:
        return ENDPOINTS[value]
    raise typer.BadParameter(f"{value!r}: use chat, completions or one of {', '.join(ENDPOINTS.values())}")


def prepare(
    input: Path | None,
    prompts: Path | None,
    endpoint: str | None,
    model: str | None,
    max_tokens: int | None,
    temperature: float | None,
) -> Prepared:
    chosen = _endpoint(endpoint)
    if (input is None) == (prompts is None):
        raise typer.BadParameter("give either an input JSONL file or --prompts FILE (one of the two)")
    if prompts is not None:
        from broker.settings import DEFAULT_MODEL

        ep = chosen or ENDPOINTS["chat"]
        text = _read(prompts).decode()
        data, n = ba.prompts_jsonl(
            text, model=model or DEFAULT_MODEL, endpoint=ep, max_tokens=max_tokens, temperature=temperature
        )
        if not n:
            raise typer.BadParameter(f"{prompts} has no prompts")
        return Prepared(ba.sha256(data), prompts.stem + ".jsonl", ep, lambda: io.BytesIO(data))
    assert input is not None
    if model is not None or max_tokens is not None or temperature is not None:
        raise typer.BadParameter(
            "--model, --max-tokens and --temperature go with --prompts (JSONL lines carry their own)"
        )
    _read(input, probe=True)
    path = input
    ep = chosen or ba.endpoint_of(path) or ENDPOINTS["chat"]
    return Prepared(ba.sha256(path), path.name, ep, lambda: path.open("rb"))


def _read(path: Path, probe: bool = False) -> bytes:
    try:
        with path.open("rb") as f:
            return f.read(1) if probe else f.read()
    except OSError as e:
        raise typer.BadParameter(f"cannot read {path}: {e.strerror}") from None


# -- run --------------------------------------------------------------------------------------
@app.command("run")
def run_command(
    input: Input = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Default: <input>.output.jsonl")] = None,
    prompts: Prompts = None,
    endpoint: Endpoint = None,
    model: Model = None,
    max_tokens: MaxTokens = None,
    temperature: Temperature = None,
    new: Annotated[
        bool, typer.Option("--new", help="Start a new batch even if one was started for this output.")
    ] = False,
    poll_s: Annotated[float, typer.Option(min=0.05, max=10.0, help="Seconds between two looks at the batch.")] = 0.5,
    url: Url = ba.DEFAULT_URL,
    key: Key = None,
) -> None:
    """Upload, create, follow with a progress bar, download output and errors. Re-run to resume."""
    prep = prepare(input, prompts, endpoint, model, max_tokens, temperature)
    src = input or prompts
    assert src is not None
    out = output or src.with_name(src.stem + ".output.jsonl")
    try:
        with api_errors(), connect(url, key) as c:
            b = start_or_resume(c, prep, out, str(src), new)
            b = follow(c, b, poll_s)
            finish(c, b, out)
    except KeyboardInterrupt:
        say("[yellow]interrupted[/]: run the same command again to resume.")
        raise typer.Exit(EXIT_INTERRUPTED) from None


def start_or_resume(c: ba.BatchApi, prep: Prepared, out: Path, src: str, new: bool) -> dict[str, Any]:
    state = None if new else ba.load_state(out)
    if state is not None and state.api_url != c.url:
        say(f"{out} was being made by {state.api_url}; starting a new batch on {c.url}.")
        state = None
    if state is not None and state.input_sha256 != prep.sha256:
        was = f" (batch {state.batch_id})" if state.batch_id else ""
        say(f"[yellow]the input changed[/] since the last run{was}: starting a new batch.")
        state = None
    if state is not None and state.batch_id:
        try:
            b = c.get(state.batch_id)
        except ba.ApiError as e:
            if e.status != 404:
                raise
            say(f"batch {state.batch_id} no longer exists on this API (or for this key): starting a new batch.")
        else:
            say(f"resuming batch [bold]{b['id']}[/] ({b['status']})")
            return b
        state = None
    if state is not None and state.file_id and c.file_exists(state.file_id):
        found = c.find_by_input(state.file_id)  # a run killed between creating the batch and saving its id
        if found is not None:
            state.batch_id = found["id"]
            ba.save_state(out, state)
            say(f"resuming batch [bold]{found['id']}[/] ({found['status']})")
            return found
        file_id = state.file_id
    else:
        state = ba.RunState(c.url, prep.sha256, src, prep.endpoint)
        with prep.open() as f:
            file_id = c.upload(f, prep.filename)
        state.file_id = file_id
        ba.save_state(out, state)
    b = c.create(file_id, state.endpoint, metadata={"created_by": "genq batch run"})
    state.batch_id = b["id"]
    ba.save_state(out, state)
    say(f"batch [bold]{b['id']}[/] created ({state.endpoint}, input {file_id})")
    return b


class Rate:
    """Lines per second over the last ``window_s`` seconds of samples."""

    def __init__(self, window_s: float = 15.0) -> None:
        self.window_s = window_s
        self.samples: deque[tuple[float, int]] = deque()

    def add(self, done: int) -> float | None:
        now = time.monotonic()
        self.samples.append((now, done))
        while len(self.samples) > 2 and self.samples[1][0] < now - self.window_s:
            self.samples.popleft()
        t0, d0 = self.samples[0]
        return (done - d0) / (now - t0) if now - t0 >= 1.0 and done > d0 else None


def _fields(b: dict[str, Any], rate: float | None) -> dict[str, Any]:
    n = b["request_counts"]
    done, total = n["completed"] + n["failed"], n["total"]
    eta = "-"
    if rate and total:
        left_s = int((total - done) / rate)
        eta = f"{left_s // 3600}:{left_s // 60 % 60:02d}:{left_s % 60:02d}"
    return {
        "status": b["status"],
        "counts": f"done {n['completed']} · failed {n['failed']} · total {total or '?'}",
        "speed": f"{rate:.1f} lines/s" if rate else "- lines/s",
        "eta": eta,
    }


def follow(c: ba.BatchApi, b: dict[str, Any], poll_s: float) -> dict[str, Any]:
    """Poll the batch until it ends, with a progress bar; Ctrl-C stops following, not the batch."""
    if b["status"] in ba.TERMINAL:
        return b
    rate = Rate()
    progress = Progress(
        TextColumn("{task.fields[status]:<12}"),
        BarColumn(),
        TextColumn("{task.fields[counts]}  {task.fields[speed]}  ETA {task.fields[eta]}"),
        console=err,
    )
    plain_at = 0.0  # not a terminal: a plain line now and then instead of a live bar
    down_since: float | None = None
    try:
        with progress:
            task: TaskID = progress.add_task("batch", total=None, **_fields(b, None))
            while True:
                n = b["request_counts"]
                fields = _fields(b, rate.add(n["completed"] + n["failed"]))
                progress.update(task, completed=n["completed"] + n["failed"], total=n["total"] or None, **fields)
                if not err.is_terminal and time.monotonic() - plain_at >= 5.0:
                    plain_at = time.monotonic()
                    say(f"{b['id']} {fields['status']}: {fields['counts']}, {fields['speed']}, ETA {fields['eta']}")
                if b["status"] in ba.TERMINAL:
                    return b
                time.sleep(poll_s)  # a batch has no event stream; a look every poll_s is cheap
                try:
                    b, down_since = c.get(b["id"]), None
                except ba.ApiError as e:
                    if not e.transient:
                        raise
                    down_since = down_since or time.monotonic()
                    if time.monotonic() - down_since > GIVE_UP_S:
                        say(f"the API has not answered for {GIVE_UP_S:.0f} s; the batch keeps running.")
                        raise
                    progress.update(task, status="(no answer)")
    except KeyboardInterrupt:
        say(
            f"\nstopped following; batch [bold]{b['id']}[/] keeps running.\n"
            f"  resume:  run the same command again\n"
            f"  cancel:  genq batch cancel {b['id']}"
        )
        raise typer.Exit(EXIT_INTERRUPTED) from None


def print_errors(b: dict[str, Any]) -> None:
    for e in (b.get("errors") or {}).get("data") or []:
        where = f"line {e['line']}: " if e.get("line") and not str(e.get("message", "")).startswith("Line") else ""
        say(f"  {escape(where + str(e.get('message')))} ({escape(str(e.get('code')))})")


def download_results(c: ba.BatchApi, b: dict[str, Any], out: Path) -> tuple[Path | None, Path | None]:
    """The batch's output (``out``, empty if no line succeeded) and errors (``<out>.errors.jsonl``)."""
    errs = ba.errors_path(out)
    if b.get("output_file_id"):
        c.download(b["output_file_id"], out)
    else:
        with ba.atomic_file(out):
            pass
    if b.get("error_file_id"):
        c.download(b["error_file_id"], errs)
        return out, errs
    errs.unlink(missing_ok=True)  # a previous run's, not this batch's
    return out, None


def finish(c: ba.BatchApi, b: dict[str, Any], out: Path) -> None:
    n, status = b["request_counts"], b["status"]
    if status == "failed":
        say(f"[red]batch {b['id']} failed[/]: the input was refused, nothing ran.")
        print_errors(b)
        say("fix the input and run again (a changed input starts a new batch).")
        raise typer.Exit(EXIT_NOT_COMPLETED)
    _, errs = download_results(c, b, out)
    wrote = f"{n['completed']} lines -> {out}" + (f", {n['failed']} failed -> {errs}" if errs else "")
    if status == "completed":
        say(f"[green]completed[/] {b['id']}: {wrote}")
        return
    say(f"[red]batch {b['id']} {status}[/] before every line ran: {wrote}. `--new` starts the batch afresh.")
    raise typer.Exit(EXIT_NOT_COMPLETED)


# -- the single calls -------------------------------------------------------------------------
@app.command("submit")
def submit_command(
    input: Input = None,
    prompts: Prompts = None,
    endpoint: Endpoint = None,
    model: Model = None,
    max_tokens: MaxTokens = None,
    temperature: Temperature = None,
    url: Url = ba.DEFAULT_URL,
    key: Key = None,
) -> None:
    """Upload and create a batch; print its id (nothing else) on stdout."""
    prep = prepare(input, prompts, endpoint, model, max_tokens, temperature)
    with api_errors(), connect(url, key) as c:
        with prep.open() as f:
            file_id = c.upload(f, prep.filename)
        b = c.create(file_id, prep.endpoint, metadata={"created_by": "genq batch submit"})
    typer.echo(b["id"])


def _when(ts: int | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


@app.command("status")
def status_command(batch_id: str, as_json: AsJson = False, url: Url = ba.DEFAULT_URL, key: Key = None) -> None:
    """One batch: status, counts, times, files, errors."""
    with api_errors(), connect(url, key) as c:
        b = c.get(batch_id)
    if as_json:
        typer.echo(json.dumps(b, indent=2))
        return
    n = b["request_counts"]
    t = Table.grid(padding=(0, 2))
    for k, v in (
        ("id", b["id"]),
        ("status", b["status"]),
        ("endpoint", b["endpoint"]),
        ("requests", f"{n['completed']} completed, {n['failed']} failed, {n['total']} total"),
        ("created", _when(b["created_at"])),
        ("ended", _when(b.get(f"{b['status']}_at")) if b["status"] in ba.TERMINAL else "-"),
        ("input", b["input_file_id"]),
        ("output", b.get("output_file_id") or "-"),
        ("errors", b.get("error_file_id") or "-"),
    ):
        t.add_row(k, escape(str(v)))
    Console().print(t)
    print_errors(b)


@app.command("list")
def list_command(
    limit: Annotated[int, typer.Option(min=1, max=100)] = 20,
    after: Annotated[str | None, typer.Option(help="The last id of the previous page.")] = None,
    as_json: AsJson = False,
    url: Url = ba.DEFAULT_URL,
    key: Key = None,
) -> None:
    """Your batches, newest first."""
    with api_errors(), connect(url, key) as c:
        page = c.list(limit, after)
    if as_json:
        typer.echo(json.dumps(page, indent=2))
        return
    t = Table("id", "status", "completed", "failed", "total", "created", "endpoint")
    for b in page["data"]:
        n = b["request_counts"]
        t.add_row(
            b["id"],
            b["status"],
            str(n["completed"]),
            str(n["failed"]),
            str(n["total"]),
            _when(b["created_at"]),
            b["endpoint"],
        )
    Console(width=200).print(t)
    if page.get("has_more"):
        say(f"more: genq batch list --after {page['data'][-1]['id']}")


@app.command("cancel")
def cancel_command(batch_id: str, url: Url = ba.DEFAULT_URL, key: Key = None) -> None:
    """Cancel a batch: lines already finished are kept in its output."""
    with api_errors(), connect(url, key) as c:
        b = c.cancel(batch_id)
    typer.echo(f"{b['id']} {b['status']}")


@app.command("download")
def download_command(
    batch_id: str,
    output: Annotated[Path, typer.Option("-o", "--output", help="Output JSONL; errors go to <output>.errors.jsonl.")],
    url: Url = ba.DEFAULT_URL,
    key: Key = None,
) -> None:
    """Download a finished batch's output and errors."""
    with api_errors(), connect(url, key) as c:
        b = c.get(batch_id)
        if b["status"] not in ba.TERMINAL:
            say(f"batch {batch_id} is {b['status']}: its output is written when it ends (`genq batch run` follows it).")
            raise typer.Exit(EXIT_NOT_COMPLETED)
        if b["status"] == "failed":
            say(f"[red]batch {batch_id} failed[/]: nothing ran.")
            print_errors(b)
            raise typer.Exit(EXIT_NOT_COMPLETED)
        _, errs = download_results(c, b, output)
    n = b["request_counts"]
    say(
        f"{b['status']} {batch_id}: {n['completed']} lines -> {output}" + (f", {n['failed']} -> {errs}" if errs else "")
    )
