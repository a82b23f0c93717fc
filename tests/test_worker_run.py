"""A job run's lifecycle and output buffer (worker/run.py), without Redis or an engine."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path
from types import SimpleNamespace

from broker.client import OutputWrite
from worker.engine.base import Delta
from worker.run import JobRun, RunState

ROOT = Path(__file__).resolve().parent.parent


def new_run(resumed: list[int] | None = None, stream: bool = True) -> JobRun:
    job = SimpleNamespace(id="j1", tenant="t", attempts=1, output_token_ids=resumed or [], created_ms=0)
    job.request = SimpleNamespace(stream=stream)
    return JobRun.start(SimpleNamespace(job=job, fence=7), "w")  # type: ignore[arg-type]


def test_transitions() -> None:
    run = new_run()
    assert run.state is RunState.RUNNING and run.leased and not run.interrupted
    assert run.cancel_requested_now("notice") and run.cancel_requested and run.interrupted
    assert not run.cancel_requested_now("renew")  # news only once
    run.finishing()
    assert run.state is RunState.FINISHING and run.leased
    assert not run.cancel_requested_now("renew")  # a finishing run is not aborted
    assert run.drop("append rejected") and run.lost and not run.leased
    assert not run.drop("again")
    run.finishing()
    run.failing()
    assert run.state is RunState.DROPPED  # a dropped run is never revived
    run.done()
    assert run.state is RunState.DONE and not run.drop("late")


async def test_hand_back_cancels_a_running_run_only() -> None:
    run, started, ended = new_run(), asyncio.Event(), asyncio.Event()

    async def work(r: JobRun) -> None:
        started.set()
        await asyncio.Event().wait()  # generating until cancelled

    def on_done(r: JobRun) -> None:
        r.done()
        ended.set()

    run.launch(work, on_done)
    await asyncio.wait_for(started.wait(), 5)
    assert run.hand_back() and run.state is RunState.FAILING and not run.leased
    assert not run.hand_back()
    await asyncio.wait_for(ended.wait(), 5)
    assert run.task is not None and run.task.cancelled() and run.state is RunState.DONE


def test_output_buffer_offsets_and_replays() -> None:
    run = new_run(resumed=[1, 2])  # two tokens came from an earlier attempt
    assert run.add(Delta("a", [10], prompt_tokens=3)) is True  # the first token
    assert run.add(Delta("b", [11], prompt_tokens=3)) is False
    (w,) = run.output.next_writes()
    assert w == OutputWrite("j1", 7, "ab", [10, 11], 2)
    run.output.unknown(w)  # reply lost: the same write again, then what came since
    run.add(Delta("c", [12], prompt_tokens=3))
    assert run.output.next_writes() == [w, OutputWrite("j1", 7, "c", [12], 4)]
    run.output.acknowledged(w)
    assert run.output.offset == 4 and not run.output.pending


def test_an_unstreamed_buffer_is_checkpointed_only_when_due() -> None:
    run = new_run(stream=False)
    assert not run.output.streamed
    run.add(Delta("a", [10], prompt_tokens=3))
    assert not run.output.checkpoint_due(3600.0)  # just started: the output waits
    assert not run.output.checkpoint_due(0.0)  # 0: never a checkpoint of its own
    run.output.last_write_at -= 3600.0  # as if an hour passed
    assert run.output.checkpoint_due(3600.0)
    (w,) = run.output.next_writes()
    assert w.text == "a" and not run.output.checkpoint_due(3600.0)  # the clock restarts at each write


def test_run_state_is_assigned_only_in_worker_run() -> None:
    """No ``run.state = ...`` (nor outcome, cancel time, task) outside the run's own transitions."""
    offenders = []
    for path in sorted((ROOT / "worker").rglob("*.py")):
        if path.name == "run.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = node.targets if isinstance(node, ast.Assign) else []
            if isinstance(node, (ast.AugAssign, ast.AnnAssign)):
                targets = [node.target]
            for t in targets:
                if (
                    isinstance(t, ast.Attribute)
                    and t.attr.lstrip("_") in {"state", "outcome", "cancel_at", "task"}
                    and ast.unparse(t.value) != "self"  # an object's own attributes are its business
                ):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(t)}")
    assert offenders == []
