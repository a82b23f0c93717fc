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
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from genq import batch_api as ba
from genq import batch_run as run
from genq.batch_run import EXIT_API, EXIT_INTERRUPTED, EXIT_NOT_COMPLETED, Prepared, say

app = typer.Typer(no_args_is_help=True, add_completion=False, help="OpenAI batches: run, submit, status, list, ...")

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
    if not out.parent.is_dir():
        raise typer.BadParameter(f"{out.parent} is not a folder", param_hint="--output")
    try:
        with api_errors(), connect(url, key) as c:
            b = run.start_or_resume(c, prep, out, str(src), new)
            b = run.follow(c, b, poll_s)
            run.finish(c, b, out)
    except KeyboardInterrupt:
        say("[yellow]interrupted[/]: run the same command again to resume.")
        raise typer.Exit(EXIT_INTERRUPTED) from None


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
    run.print_errors(b)


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
            run.print_errors(b)
            raise typer.Exit(EXIT_NOT_COMPLETED)
        _, errs = run.download_results(c, b, output)
    n = b["request_counts"]
    say(
        f"{b['status']} {batch_id}: {n['completed']} lines -> {output}" + (f", {n['failed']} -> {errs}" if errs else "")
    )
