"""A simulated engine: deterministic tokens, continuous-batching timing, no model.

Behaviour, chosen so tests and load experiments can rely on it:

- Token ``i`` of a completion is a hash of (prompt or messages, seed, i); its
  id lies in ``[0, VOCAB_SIZE)`` and its text is ``f" tok{id}"``.  Sampling
  parameters other than ``seed`` are ignored.  A request resumed with
  ``resume_token_ids`` of length ``k`` continues at position ``k``, so the
  earlier part plus the resumed stream equal one unresumed stream.
- Logprobs, when asked for, are FAKE (there is no model): :func:`sim_logprobs`, a
  function of the token id, the sampled token ranked first.
- One step loop serves every running sequence.  A step takes
  ``sim_step_ms + sim_step_ms_per_seq * running`` and gives each running
  sequence ``sim_tokens_per_step`` tokens (one Delta per sequence per step).
- At most ``max_num_seqs`` sequences run; the rest wait in FIFO order of
  (priority, arrival) and are admitted at the start of a step.
- There is no EOS: a stream ends with ``"length"`` when its budget (or
  ``max_model_len``) is used up, or with ``"stop"`` when a token's text
  contains one of ``stop`` (that token's text is cut before the match).
- Prompt tokens = number of whitespace-separated words of the prompt, or of
  all message contents together for chat.
- ``kill()`` simulates an engine crash: open streams and later calls raise
  :class:`EngineDeadError`.  ``close()`` ends open streams with ``"abort"``.

Pure asyncio: no threads, nothing blocks the loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import itertools
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import structlog

from broker.contract import TokenLogprob
from worker.engine.base import (
    Delta,
    EngineBase,
    EngineDeadError,
    EngineSettings,
    EngineStats,
    GenRequest,
    InvalidRequestError,
    PromptTooLongError,
    check_request,
)

log = structlog.get_logger(__name__)

VOCAB_SIZE = 49152  # SmolLM2's vocabulary size, for realistic ids
SIM_MODEL_NAME = "simulated"


def sim_token_id(key: bytes, position: int) -> int:
    """The deterministic token at ``position`` of the completion for ``key``."""
    digest = hashlib.blake2b(key + position.to_bytes(8, "little"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % VOCAB_SIZE


def sim_token_text(token_id: int) -> str:
    return f" tok{token_id}"


def sim_logprobs(token_id: int, top: int) -> TokenLogprob:
    """FAKE logprobs for a simulated token: its own in (-0.9, -0.01], then ``top`` made-up
    alternatives (the token itself first, as the most likely), each one nat less likely."""
    text, logprob = sim_token_text(token_id), -((token_id % 90) + 1) / 100
    others = [(sim_token_text((token_id + j) % VOCAB_SIZE), logprob - j) for j in range(1, top)]
    return TokenLogprob(text, logprob, tuple([(text, logprob), *others][:top]))


def request_key(req: GenRequest) -> bytes:
    """What the simulated completion depends on: prompt/messages and seed."""
    body = req.prompt if req.prompt is not None else req.messages
    return json.dumps([body, req.sampling.seed], sort_keys=True).encode()


def count_words(prompt: str | None, messages: list[dict[str, Any]] | None) -> int:
    if prompt is not None:
        return len(prompt.split())
    total = 0
    for message in messages or []:
        content = message.get("content") or ""
        if isinstance(content, list):  # OpenAI content parts
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
        total += len(str(content).split())
    return total


@dataclass(slots=True, eq=False)
class _Seq:
    req: GenRequest
    key: bytes
    prompt_tokens: int
    position: int  # index of the next completion token
    end: int  # position at which the budget is exhausted
    out: asyncio.Queue[Delta | BaseException] = field(default_factory=asyncio.Queue)
    done: bool = False


class SimulatedEngine(EngineBase):
    """See the module docstring."""

    def __init__(self, settings: EngineSettings) -> None:
        self.settings = settings
        self.model_name = settings.served_model_name or SIM_MODEL_NAME
        self.max_model_len = settings.max_model_len
        self.capacity = settings.max_num_seqs
        self._running: dict[str, _Seq] = {}
        self._waiting: list[tuple[int, int, _Seq]] = []  # heap
        self._waiting_ids: dict[str, _Seq] = {}
        self._arrivals = itertools.count()
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._dead: str | None = None  # why the engine is unusable
        self.steps = 0  # number of steps run, for tests and metrics

    # -- lifecycle -------------------------------------------------------
    async def start(self) -> None:
        if self._loop_task is None and self._dead is None:
            self._loop_task = asyncio.create_task(self._step_loop(), name="sim-engine-steps")
            log.info("engine.started", kind="simulated", capacity=self.capacity)

    async def close(self) -> None:
        if self._dead is None:
            self._dead = "engine closed"
        await self._stop_loop()
        for seq in self._all_seqs():
            self._finish(seq, "abort")

    def kill(self, exc: BaseException | None = None) -> None:
        """Simulate a crash: open and later streams raise EngineDeadError."""
        self._dead = f"simulated engine died: {exc!r}"
        if self._loop_task is not None:
            self._loop_task.cancel()
        for seq in self._all_seqs():
            self._drop(seq)
            seq.out.put_nowait(EngineDeadError(self._dead))

    async def _stop_loop(self) -> None:
        task, self._loop_task = self._loop_task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    # -- public API ------------------------------------------------------
    def stats(self) -> EngineStats:
        used = sum(s.prompt_tokens + s.position for s in self._running.values())
        return EngineStats(
            running=len(self._running),
            waiting=len(self._waiting_ids),
            kv_cache_usage=min(1.0, used / (self.capacity * self.max_model_len)),
        )

    def count_prompt_tokens(self, prompt: str | None, messages: list[dict[str, Any]] | None) -> int:
        return count_words(prompt, messages)

    async def abort(self, request_id: str) -> None:
        seq = self._running.get(request_id) or self._waiting_ids.get(request_id)
        if seq is not None:
            self._finish(seq, "abort")

    async def generate(self, req: GenRequest) -> AsyncIterator[Delta]:
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        if self._loop_task is None:
            raise RuntimeError("engine not started")
        check_request(req)
        if req.request_id in self._running or req.request_id in self._waiting_ids:
            raise InvalidRequestError(f"duplicate request_id {req.request_id!r}")
        prompt_tokens = self.count_prompt_tokens(req.prompt, req.messages)
        if prompt_tokens >= self.max_model_len:
            raise PromptTooLongError(f"prompt has {prompt_tokens} tokens, max_model_len is {self.max_model_len}")
        start = len(req.resume_token_ids)
        seq = _Seq(
            req=req,
            key=request_key(req),
            prompt_tokens=prompt_tokens,
            position=start,
            end=min(req.max_tokens, self.max_model_len - prompt_tokens),
        )
        if seq.position >= seq.end:
            yield Delta("", [], prompt_tokens, "length")
            return
        heapq.heappush(self._waiting, (req.priority, next(self._arrivals), seq))
        self._waiting_ids[req.request_id] = seq
        self._wake.set()
        try:
            while True:
                item = await seq.out.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            if not seq.done:  # consumer went away (cancelled / aclose)
                self._drop(seq)

    # -- the step loop ---------------------------------------------------
    async def _step_loop(self) -> None:
        try:
            await self._steps()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here must not leave streams hanging
            log.exception("engine.step_loop_crashed")
            self.kill(exc)

    async def _steps(self) -> None:
        s = self.settings
        while True:
            self._admit()
            if not self._running:
                self._wake.clear()
                await self._wake.wait()
                continue
            step_ms = s.sim_step_ms + s.sim_step_ms_per_seq * len(self._running)
            await asyncio.sleep(step_ms / 1000)
            self.steps += 1
            for seq in list(self._running.values()):
                self._advance(seq, s.sim_tokens_per_step)

    def _admit(self) -> None:
        while self._waiting and len(self._running) < self.capacity:
            _, _, seq = heapq.heappop(self._waiting)
            if seq.done:  # aborted while waiting; lazily removed from heap
                continue
            del self._waiting_ids[seq.req.request_id]
            self._running[seq.req.request_id] = seq

    def _advance(self, seq: _Seq, n: int) -> None:
        ids: list[int] = []
        texts: list[str] = []
        finish: str | None = None
        stops = seq.req.sampling.stop or []
        for _ in range(n):
            tid = sim_token_id(seq.key, seq.position)
            text = sim_token_text(tid)
            seq.position += 1
            hit = min((i for st in stops if (i := text.find(st)) >= 0), default=-1)
            if hit >= 0:
                texts.append(text[:hit])
                ids.append(tid)
                finish = "stop"
                break
            ids.append(tid)
            texts.append(text)
            if seq.position >= seq.end:
                finish = "length"
                break
        top = seq.req.sampling.logprobs
        logprobs = None if top is None else [sim_logprobs(tid, top) for tid in ids]
        seq.out.put_nowait(Delta("".join(texts), ids, seq.prompt_tokens, finish, logprobs))
        if finish is not None:
            seq.done = True
            self._drop(seq)

    # -- bookkeeping -----------------------------------------------------
    def _finish(self, seq: _Seq, reason: str) -> None:
        if seq.done:
            return
        seq.done = True
        self._drop(seq)
        seq.out.put_nowait(Delta("", [], seq.prompt_tokens, reason))

    def _drop(self, seq: _Seq) -> None:
        seq.done = True
        rid = seq.req.request_id
        if self._running.get(rid) is seq:
            del self._running[rid]
        if self._waiting_ids.get(rid) is seq:
            del self._waiting_ids[rid]  # heap entry is skipped in _admit
        self._wake.set()

    def _all_seqs(self) -> list[_Seq]:
        return [*self._running.values(), *self._waiting_ids.values()]
