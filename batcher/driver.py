"""Drives one batch under its lease: validate, feed, collect, checkpoint, finalize.

Progress lives in Redis (``broker.batches``) and in segment files, never only in this
process, so a batcher killed at any instant is replaced without loss or repetition:

- a line's job has the idempotency key ``<batch id>:<line>``: feeding a line again
  after a crash admits nothing new, it returns the same job;
- lines fed are recorded with ``next_line`` in one guarded update;
- finished lines are written to a new segment file first, then one guarded update
  lists the segment, forgets the lines and counts them. A segment written by a batcher
  that died before its update is never listed (names are unique), so its lines are
  collected again from their jobs, whose results the broker keeps;
- finalizing concatenates the listed segments into the output and error files, whose
  ids derive from the batch id (writing them twice is harmless).

Results are collected by following each in-flight job's events to its terminal one
(the process's single pub/sub connection), never by polling jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from typing import Any

import structlog

from api.tokens import TokenCounter
from batcher import lines as L
from batcher.settings import BatcherSettings
from batcher.storage import FileStore
from broker import Broker
from broker import errors as be
from broker.batches import BatchStatusConflict, LeaseLost
from broker.contract import JobSpec, JobStatus
from broker.events import EventHub
from broker.models import Admission

log = structlog.get_logger(__name__)

TERMINAL = {"completed", "failed", "expired", "cancelled"}
STOPPED = {"cancelled": "batch_cancelled", "expired": "batch_expired"}


def out_file_id(batch_id: str, kind: str) -> str:
    return f"file-{batch_id.removeprefix('batch_')}{kind}"


class Driver:
    """What one batcher process shares between the batches it drives."""

    def __init__(self, broker: Broker, hub: EventHub, store: FileStore, settings: BatcherSettings, owner: str) -> None:
        self.broker, self.hub, self.store, self.settings, self.owner = broker, hub, store, settings, owner
        self.tokens = TokenCounter()

    async def drive(self, batch_id: str) -> str:
        """Drive a batch for one slice: ``done``, ``yield`` (more to do) or ``busy`` (another batcher has it)."""
        bs, ttl_ms = self.broker.batches, self.settings.batch_lease_ms
        # One owner per run, not per process: a run whose lease lapsed (a stalled loop) and was
        # taken over, even by this same process, is refused at its next guarded update.
        owner = f"{self.owner}:{secrets.token_hex(4)}"
        held, epoch = await bs.lease(batch_id, owner, ttl_ms)
        if not held:
            return "busy"
        keeper = asyncio.create_task(self._keep(batch_id, owner))
        try:
            with structlog.contextvars.bound_contextvars(batch_id=batch_id, epoch=epoch):
                return await Run(self, batch_id, epoch, owner).run()
        except LeaseLost:
            log.warning("batch lease lost; another batcher drives it")
            return "busy"
        finally:
            keeper.cancel()
            with contextlib.suppress(be.BrokerError):
                await bs.lease(batch_id, owner, ttl_ms, release=True)

    async def _keep(self, batch_id: str, owner: str) -> None:
        """Renew the lease on a timer of its own, so a long step of the run cannot let it lapse."""
        ttl_ms = self.settings.batch_lease_ms
        while True:
            await asyncio.sleep(ttl_ms / 3000)  # a period, not a wait for an event
            with contextlib.suppress(be.Unavailable):
                held, _ = await self.broker.batches.lease(batch_id, owner, ttl_ms)
                if not held:
                    return  # the run's next guarded update raises LeaseLost


class Run:
    def __init__(self, d: Driver, batch_id: str, epoch: int, owner: str) -> None:
        self.d, self.id, self.epoch, self.owner = d, batch_id, epoch, owner
        self.bs = d.broker.batches
        self.lines: list[L.Line] = []
        self.fed: dict[int, str] = {}  # line index -> job id (or "!" + the output line)
        self.waiters: dict[int, asyncio.Task[tuple[bool, dict[str, Any]]]] = {}
        self.stopping: str | None = None  # batch_cancelled / batch_expired while stopping
        self.segment = 0
        self.rec: dict[str, str] = {}

    # -- the loop -----------------------------------------------------------
    async def run(self) -> str:
        try:
            return await self._run()
        finally:
            for t in self.waiters.values():
                t.cancel()

    async def _run(self) -> str:
        self.rec = await self.bs.get_batch(self.id) or {}
        status = self.rec.get("status")
        if not status or status in TERMINAL:
            return "done"
        if status == "validating":
            if not await self.validate():
                return "done"
        elif problems := await self._parse():  # the input file was deleted under a running batch
            await self.fail(problems, ("in_progress", "cancelling", "finalizing"))
            return "done"
        loop = asyncio.get_running_loop()
        slice_end = loop.time() + self.d.settings.batch_slice_s
        self.fed = await self.bs.fed_lines(self.id)
        retry_at = 0.0
        while True:
            await self.renew()
            self.rec = await self.bs.get_batch(self.id) or {}
            status = self.rec.get("status", "")
            if status == "cancelling":
                return await self.stop("cancelled")
            if status == "finalizing":
                return await self.finalize("completed")
            if time.time() >= float(self.rec["expires_at"]):
                return await self.stop("expired")
            next_line = int(self.rec.get("next_line", 0))
            if next_line < len(self.lines) and loop.time() >= retry_at:
                retry_at = await self.feed(next_line)
            elif not self.fed and next_line >= len(self.lines):
                await self.bs.update(self.id, owner=self.owner, allowed=("in_progress",), set=_at("finalizing"))
                return await self.finalize("completed")
            self.watch()
            wait_s = self.d.settings.batch_lease_ms / 3000
            if retry_at > loop.time():
                wait_s = min(wait_s, retry_at - loop.time())
            await self.collect(max(0.01, wait_s))
            if loop.time() >= slice_end:
                return "yield"

    async def renew(self) -> None:
        held, _ = await self.bs.lease(self.id, self.owner, self.d.settings.batch_lease_ms)
        if not held:
            raise LeaseLost(self.id)

    # -- validating ----------------------------------------------------------
    async def _parse(self) -> list[L.LineError]:
        f = await self.bs.get_file(self.rec["input_file_id"], self.rec["tenant"])
        if f is None:
            return [L.LineError("file_not_found", f"The input file {self.rec['input_file_id']} no longer exists.")]
        data = await self.d.store.read(f["path"])
        models = set(await self.d.broker.models())
        self.lines, problems = L.parse(data, self.rec["endpoint"], models)
        return problems

    async def fail(self, problems: list[L.LineError], allowed: tuple[str, ...]) -> None:
        errs = {"object": "list", "data": [p.as_dict() for p in problems]}
        await self.bs.update(
            self.id, owner=self.owner, allowed=allowed, set={**_at("failed"), "errors": json.dumps(errs)}, done=True
        )
        log.info("batch failed", problems=len(problems), first=problems[0].message)

    async def validate(self) -> bool:
        problems = await self._parse()
        try:
            if problems:
                await self.fail(problems, ("validating",))
                return False
            await self.bs.update(
                self.id,
                owner=self.owner,
                allowed=("validating",),
                set={**_at("in_progress"), "total": len(self.lines), "next_line": 0},
            )
            log.info("batch validated", lines=len(self.lines))
        except BatchStatusConflict:  # cancelled while validating: the loop sees it
            pass
        return True

    # -- feeding ---------------------------------------------------------------
    async def feed(self, next_line: int) -> float:
        """Admit lines up to the per-batch limit; returns when to try again after a refusal (0: no wait)."""
        room = self.d.settings.batch_max_in_flight - len(self.fed)
        chunk = list(range(next_line, min(len(self.lines), next_line + room)))
        if not chunk:
            return 0.0
        d, rec = self.d, self.rec
        models = await d.broker.models()
        specs: list[tuple[int, JobSpec]] = []
        outcome: dict[int, Admission | be.BrokerError] = {}
        for i in chunk:
            line = self.lines[i]
            try:
                specs.append(
                    (
                        i,
                        await L.to_spec(
                            line,
                            tenant=rec["tenant"],
                            batch_id=self.id,
                            priority=d.settings.batch_priority,
                            info=models.get(line.sub.model, {}),
                            tokens=d.tokens,
                            default_max_tokens=d.settings.default_max_tokens,
                            max_tokens_limit=d.settings.max_tokens_limit,
                        ),
                    )
                )
            except be.BrokerError as e:
                outcome[i] = e
        for (i, _), r in zip(specs, await d.broker.admit_many([s for _, s in specs]), strict=True):
            outcome[i] = r
        new: dict[int, str] = {}
        advance, retry_at = next_line, 0.0
        for i in chunk:
            r = outcome[i]
            if isinstance(r, be.AdmissionRefused) or isinstance(r, be.Unavailable):
                # Later lines admitted in the same round are admitted again then (same job).
                wait_ms = getattr(r, "retry_after_ms", 1000)
                retry_at = asyncio.get_running_loop().time() + max(0.05, wait_ms / 1000)
                log.info("batch feeding paused", reason=getattr(r, "reason", "unavailable"), retry_after_ms=wait_ms)
                break
            if isinstance(r, be.BrokerError):
                new[i] = "!" + json.dumps(L.refused_line(self.id, self.lines[i], r))
            else:
                new[i] = r.job_id
            advance = i + 1
        if new or advance != next_line:
            await self.bs.update(
                self.id, owner=self.owner, allowed=("in_progress",), set={"next_line": advance}, lines=new
            )
            self.fed.update(new)
        return retry_at

    # -- collecting --------------------------------------------------------------
    def watch(self) -> None:
        for i, v in self.fed.items():
            if i not in self.waiters:
                self.waiters[i] = asyncio.create_task(self.outcome(i, v), name=f"batch-line-{i}")

    async def outcome(self, i: int, v: str) -> tuple[bool, dict[str, Any]]:
        line = self.lines[i]
        if v.startswith("!"):
            return False, json.loads(v[1:])
        try:
            async with contextlib.aclosing(self.d.hub.follow(v)) as events:
                async for ev in events:
                    if ev is not None and ev.terminal:
                        break
            job = await self.d.broker.get_job(v)
        except be.NotFound:
            err = {"error": {"message": "The request's result expired.", "type": "server_error", "code": "expired"}}
            return False, L.response_line(self.id, line, 500, err, v)
        if job.status is JobStatus.CANCELLED and self.stopping:
            return False, L.never_ran_line(self.id, line, self.stopping)
        asked = job.status is JobStatus.SUCCEEDED and job.request.sampling.logprobs is not None
        logprobs = await self.d.broker.logprobs(v) if asked else None
        return L.job_line(self.id, line, job, self.rec["endpoint"], logprobs)

    async def collect(self, timeout_s: float) -> int:
        """Wait up to ``timeout_s`` for lines to finish; write and checkpoint those that did."""
        if not self.waiters:
            await asyncio.sleep(timeout_s)  # nothing in flight: only a feeding retry to wait for
            return 0
        done, pending = await asyncio.wait(self.waiters.values(), timeout=timeout_s, return_when="FIRST_COMPLETED")
        if done and pending and self.d.settings.batch_flush_s:
            await asyncio.wait(pending, timeout=self.d.settings.batch_flush_s)  # gather a few more per segment
        finished: dict[int, tuple[bool, dict[str, Any]]] = {}
        for i, t in list(self.waiters.items()):
            if not t.done():
                continue
            del self.waiters[i]
            if t.exception() is not None:  # e.g. Redis away: watched again next round
                log.warning("collecting a batch line failed; retrying", line=i, error=repr(t.exception()))
                continue
            finished[i] = t.result()
        if finished:
            await self.commit(finished)
        return len(finished)

    async def commit(self, finished: dict[int, tuple[bool, dict[str, Any]]]) -> None:
        order = sorted(finished)
        outs = [finished[i][1] for i in order if finished[i][0]]
        errs = [finished[i][1] for i in order if not finished[i][0]]
        segs = []
        for kind, rows in (("out", outs), ("err", errs)):
            if rows:
                name = f"batches/{self.id}/{self.epoch:06d}-{self.segment:06d}-{secrets.token_hex(3)}.{kind}.jsonl"
                await self.d.store.write(name, L.jsonl(rows))
                segs.append(f"{kind}:{name}")
        self.segment += 1
        await self.bs.update(
            self.id,
            owner=self.owner,
            allowed=("in_progress", "cancelling", "finalizing"),
            unline=order,
            segs=segs,
            incr={"completed": len(outs), "failed": len(errs)},
        )
        for i in order:
            self.fed.pop(i, None)

    # -- ending ------------------------------------------------------------------
    async def stop(self, final: str) -> str:
        """Cancel or expire: abort what is in flight, keep what finished, then finalize."""
        self.stopping = STOPPED[final]
        tenant = self.rec["tenant"]
        for v in self.fed.values():
            if not v.startswith("!"):
                with contextlib.suppress(be.NotFound, be.AlreadyTerminal):
                    await self.d.broker.cancel(v, tenant)
        self.watch()
        while self.waiters:  # running lines are aborted by their workers within a second
            await self.renew()
            await self.collect(self.d.settings.batch_lease_ms / 3000)
        return await self.finalize(final)

    async def finalize(self, final: str) -> str:
        d, rec = self.d, self.rec
        next_line = int(rec.get("next_line", 0))
        unfed = self.lines[next_line:] if final in STOPPED else []
        tail = [L.never_ran_line(self.id, ln, STOPPED[final]) for ln in unfed]
        segs = await self.bs.segments(self.id)
        made: dict[str, str] = {}
        for kind, head, suffix in (("out", b"", "output"), ("err", L.jsonl(tail), "error")):
            parts = [s.split(":", 1)[1] for s in segs if s.startswith(kind + ":")]
            if not parts and not head:
                continue
            fid = out_file_id(self.id, kind)
            path = fid
            size = await d.store.concat(path, parts, head)
            await self.bs.put_file(
                {
                    "id": fid,
                    "tenant": rec["tenant"],
                    "purpose": "batch_output",
                    "filename": f"{self.id}_{suffix}.jsonl",
                    "bytes": size,
                    "created_at": int(time.time()),
                    "path": path,
                }
            )
            made[f"{suffix}_file_id"] = fid
        status = await self.bs.update(
            self.id,
            owner=self.owner,
            allowed=("in_progress", "cancelling", "finalizing"),
            set={**_at(final), **made},
            incr={"failed": len(tail)},
            done=True,
        )
        with contextlib.suppress(Exception):
            await d.store.delete(f"batches/{self.id}")
        log.info("batch finished", status=status, files=made)
        return "done"


def _at(status: str) -> dict[str, Any]:
    return {"status": status, f"{status}_at": int(time.time())}
