"""The steps of ``genq batch run``: start or resume, follow with a progress bar, finish.

A run's state file is written after the upload and again once the batch exists, so a run
stopped anywhere (Ctrl-C, a crash, kill -9, a reboot) resumes: the same command finds its
batch, or its uploaded file and the batch created from it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn

from genq import batch_api as ba

err = Console(stderr=True, highlight=False, soft_wrap=True)
EXIT_NOT_COMPLETED, EXIT_API, EXIT_INTERRUPTED = 1, 3, 130
GIVE_UP_S = 120.0  # how long `run` keeps polling an API that does not answer


def say(message: str) -> None:
    err.print(message)


@dataclass
class Prepared:
    sha256: str
    filename: str
    endpoint: str
    open: Callable[[], BinaryIO]


def start_or_resume(c: ba.BatchApi, prep: Prepared, out: Path, src: str, new: bool) -> dict[str, Any]:
    state = None if new else ba.load_state(out)
    if state is not None and state.api_url != c.url:
        say(escape(f"{out} was being made by {state.api_url}; starting a new batch on {c.url}."))
        state = None
    if state is not None and (state.input_sha256, state.endpoint) != (prep.sha256, prep.endpoint):
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
