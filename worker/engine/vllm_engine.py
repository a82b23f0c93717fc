"""The vLLM engine: one in-process ``AsyncLLM`` (vllm.v1) behind genq's interface.

What this module does on top of vLLM, and why:

- Prompts are rendered here, not by vLLM: chat messages through the
  tokenizer's chat template (``add_generation_prompt=True``), then token ids;
  the request goes in as ``TokensPrompt(prompt_ids + resume_token_ids)``, so a
  resumed request continues after the tokens an earlier attempt produced and
  ``prompt_tokens`` (the original prompt only) is known without vLLM.
  ``count_prompt_tokens`` uses the same rendering, so it matches exactly.
- ``max_tokens`` counts resume tokens, and is clipped so prompt + completion
  fit in ``max_model_len``; vLLM then ends the stream with ``"length"``.
  ``min_tokens`` counts them too. Known gap of resuming: vLLM sees resumed tokens
  as prompt, so a structured-output grammar starts again after them (a retried
  constrained job may not conform) and presence/frequency penalties forget them.
- Sampling maps onto ``SamplingParams`` in one function, :func:`sampling_params`;
  logprobs come back per token (:func:`token_logprobs`) only when asked for.
- Start-up (model conversion, weight load, engine-core process spawn) blocks
  for tens of seconds, so it runs in a thread and the event loop stays free.
  vLLM spawns its engine core: the entry script needs an
  ``if __name__ == "__main__":`` guard.
- ``stats()``: vLLM has no cheap public running/waiting counters, so a small
  stat logger (vLLM's ``StatLoggerBase`` plug-in) keeps the scheduler stats
  that arrive with every engine step.  They lag by up to one step and stay
  frozen while idle, so they are capped by our own count of in-flight
  ``generate()`` calls: running = min(scheduler running, in flight),
  waiting = in flight - running (requests still being tokenized or in transit
  count as waiting).  Before the first scheduler stats arrive, running is the
  number of in-flight requests that produced a token, capped at capacity.
- Engine arguments (``EngineSettings.engine_args``) are read by vLLM's own parser
  (:mod:`worker.engine.vllm_args`) and override genq's defaults here; the engine
  configuration is built before the engine core starts, so vLLM refusing it is an
  :class:`EngineArgsError` (a start-up error), not a failed load.
- vLLM's ``EngineDeadError`` becomes genq's; its request-validation errors
  become :class:`InvalidRequestError`; anything else from vLLM becomes
  :class:`EngineError` (vLLM calls those recoverable).

Environment set before vLLM is imported (only when this module is imported):
``HF_HUB_OFFLINE=1`` (nothing is fetched at run time) and
``VLLM_NO_USAGE_STATS=1``; both can be overridden from outside.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import structlog
from pydantic import ValidationError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")

from vllm import AsyncEngineArgs, SamplingParams, TokensPrompt
from vllm.config import VllmConfig
from vllm.exceptions import VLLMClientError
from vllm.logprobs import Logprob
from vllm.outputs import CompletionOutput
from vllm.platforms import current_platform
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import (
    EngineDeadError as VllmEngineDeadError,
)
from vllm.v1.metrics.loggers import StatLoggerBase

from broker.contract import Sampling, TokenLogprob
from worker.engine.base import (
    Delta,
    EngineArgsError,
    EngineBase,
    EngineDeadError,
    EngineError,
    EngineSettings,
    EngineStats,
    GenRequest,
    InvalidRequestError,
    PromptTooLongError,
    check_request,
)
from worker.engine.vllm_args import GENQ_SETTINGS, read_engine_args
from worker.model import DEFAULT_MODEL_NAME, prepare_default_model

log = structlog.get_logger(__name__)

CPU_GPU_MEMORY_UTILIZATION = 0.3  # share of host RAM for the KV cache (FACTS)
GPU_MEMORY_UTILIZATION = 0.9
MIN_LOGPROB = -9999.0  # what vLLM's server answers for -inf


@dataclass(slots=True)
class _InFlight:
    started: bool = False  # produced at least one output
    abort_requested: bool = False


def _reason(exc: Exception) -> str:
    """vLLM's configs are pydantic dataclasses: say what their validators said, on one line."""
    if not isinstance(exc, ValidationError):
        return str(exc)
    said = [(".".join(map(str, err["loc"])) + ": " if err["loc"] else "") + err["msg"] for err in exc.errors()]
    return f"{exc.title}: " + "; ".join(said)


class _SchedulerStatsTap(StatLoggerBase):
    """Keeps the latest scheduler stats; vLLM calls it once per engine step."""

    def __init__(self, sink: VllmEngine) -> None:
        self._sink = sink

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):  # type: ignore[no-untyped-def]
        if scheduler_stats is not None:
            self._sink._sched = scheduler_stats

    def log_engine_initialized(self) -> None:
        pass


def sampling_params(sampling: Sampling, max_tokens: int, emitted: int = 0) -> SamplingParams:
    """The one mapping of genq's :class:`~broker.contract.Sampling` onto vLLM's.

    Every field goes over by name (``Sampling`` mirrors ``SamplingParams``); named here are
    only those that need more: the constraint becomes vLLM's ``StructuredOutputsParams``, and
    a resumed request (``emitted`` tokens from an earlier attempt, ``max_tokens`` what is left
    of the budget) owes only the rest of ``min_tokens``.
    """
    fields = sampling.model_dump(exclude={"structured_outputs", "min_tokens"})
    so = sampling.structured_outputs
    return SamplingParams(
        **fields,
        max_tokens=max_tokens,
        min_tokens=min(max(sampling.min_tokens - emitted, 0), max_tokens),
        structured_outputs=None
        if so is None
        else StructuredOutputsParams(**so.model_dump(by_alias=True, exclude_none=True)),
        output_kind=RequestOutputKind.DELTA,
    )


def token_logprobs(comp: CompletionOutput, top: int) -> list[TokenLogprob] | None:
    """The new tokens' logprobs of a (delta) output, with the ``top`` most likely at each position.

    vLLM gives one ``{token id: Logprob}`` per token: the sampled token and the ranks 1..top
    (one dict entry fewer when the sampled token is among them). -inf is clamped as vLLM's
    own server does, so it stays valid JSON.
    """
    if comp.logprobs is None:
        return None
    out = []
    for token_id, position in zip(comp.token_ids, comp.logprobs, strict=True):
        position = position or {}
        chosen = position.get(token_id) or Logprob(-math.inf)  # vLLM always records the sampled token
        ranked = sorted((lp for lp in position.values() if lp.rank is not None and lp.rank <= top), key=_rank)
        out.append(
            TokenLogprob(
                chosen.decoded_token or "",
                max(chosen.logprob, MIN_LOGPROB),
                tuple((lp.decoded_token or "", max(lp.logprob, MIN_LOGPROB)) for lp in ranked),
            )
        )
    return out


def _rank(lp: Logprob) -> int:
    return lp.rank or 0


class VllmEngine(EngineBase):
    """See the module docstring."""

    def __init__(self, settings: EngineSettings) -> None:
        self.settings = settings
        self.on_cpu = current_platform.is_cpu()
        self.model_name = settings.served_model_name or (
            DEFAULT_MODEL_NAME if settings.model is None else settings.model
        )
        self.max_model_len = settings.max_model_len
        self.capacity = settings.max_num_seqs
        self._llm: AsyncLLM | None = None
        self._tokenizer: Any = None
        self._inflight: dict[str, _InFlight] = {}
        self._sched: Any = None  # vllm SchedulerStats, set by _SchedulerStatsTap
        self._closed = False

    # -- lifecycle -------------------------------------------------------
    def engine_args(self, model_path: str) -> AsyncEngineArgs:
        """genq's settings and defaults, then ``settings.engine_args`` over them (EngineArgsError if refused)."""
        s = self.settings
        extra = read_engine_args(s.engine_args)
        if doubled := sorted(GENQ_SETTINGS & extra.keys()):
            raise EngineArgsError(f"engine arguments {', '.join(doubled)} are EngineSettings fields: set them there")
        dtype = s.dtype
        if self.on_cpu and s.model is None and dtype == "auto":
            dtype = "float32"  # bfloat16 gave fluent nonsense on CPU
        gpu_mem = s.gpu_memory_utilization
        if gpu_mem is None:
            gpu_mem = CPU_GPU_MEMORY_UTILIZATION if self.on_cpu else GPU_MEMORY_UTILIZATION
        eager = s.enforce_eager if s.enforce_eager is not None else self.on_cpu
        genq: dict[str, Any] = {
            "model": model_path,
            "served_model_name": self.model_name,
            "dtype": dtype,
            "max_model_len": s.max_model_len,
            "max_num_seqs": s.max_num_seqs,
            "max_num_batched_tokens": s.max_num_batched_tokens,
            "gpu_memory_utilization": gpu_mem,
            "tensor_parallel_size": s.tensor_parallel_size,
            "enforce_eager": eager,
            "scheduling_policy": "priority",
            "disable_log_stats": True,  # our tap still enables scheduler stats
            "enable_log_requests": False,
        }
        try:
            return AsyncEngineArgs(**(genq | extra))
        except (ValueError, TypeError) as e:
            raise EngineArgsError(f"vLLM refused the engine arguments: {_reason(e)}") from e

    @staticmethod
    def engine_config(args: AsyncEngineArgs) -> VllmConfig:
        """vLLM's whole configuration (reads the model's config, not its weights): blocking, a second or so."""
        try:
            return args.create_engine_config()
        except (ValueError, TypeError, NotImplementedError) as e:
            raise EngineArgsError(f"vLLM refused the engine configuration: {_reason(e)}") from e

    async def start(self) -> None:
        if self._llm is not None:
            return
        if self._closed:
            raise EngineDeadError("engine closed")
        started = time.monotonic()
        if self.settings.model is None:
            model_path = str(await asyncio.to_thread(prepare_default_model))
        else:
            model_path = self.settings.model
        args = self.engine_args(model_path)
        log.info(
            "engine.starting",
            kind="vllm",
            model=model_path,
            dtype=args.dtype,
            enforce_eager=args.enforce_eager,
            gpu_memory_utilization=args.gpu_memory_utilization,
            engine_args=self.settings.engine_args,
        )
        config = await asyncio.to_thread(self.engine_config, args)
        # Blocking for tens of seconds; AsyncLLM tolerates being built outside
        # the loop and starts its background tasks lazily in this loop.
        llm = await asyncio.to_thread(
            AsyncLLM.from_vllm_config,
            config,
            stat_loggers=[lambda _config, _idx: _SchedulerStatsTap(self)] if self.settings.scheduler_stats else None,
            enable_log_requests=args.enable_log_requests,
            disable_log_stats=args.disable_log_stats,
        )
        self._llm = llm
        try:
            # A first call from the loop starts vLLM's output task here, so an
            # engine-core failure is noticed even before the first request.
            await llm.get_supported_tasks()
            self._tokenizer = llm.get_tokenizer()
        except BaseException:
            await self.close()
            raise
        log.info(
            "engine.started",
            kind="vllm",
            model=self.model_name,
            seconds=round(time.monotonic() - started, 1),
        )

    async def close(self) -> None:
        self._closed = True
        llm, self._llm = self._llm, None
        if llm is not None:
            # Shutdown joins the engine-core process: keep it off the loop.
            await asyncio.to_thread(llm.shutdown)
            log.info("engine.closed", kind="vllm")

    # -- prompts ---------------------------------------------------------
    def _prompt_ids(self, prompt: str | None, messages: list[dict[str, Any]] | None) -> list[int]:
        tok = self._tokenizer
        if tok is None:
            raise RuntimeError("engine not started")
        if messages is not None:
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            # the template already wrote the special tokens
            return list(tok.encode(text, add_special_tokens=False))
        return list(tok.encode(prompt or ""))

    def count_prompt_tokens(self, prompt: str | None, messages: list[dict[str, Any]] | None) -> int:
        return len(self._prompt_ids(prompt, messages))

    # -- requests --------------------------------------------------------
    def stats(self) -> EngineStats:
        n = len(self._inflight)
        sched = self._sched
        if sched is not None:
            running = min(sched.num_running_reqs, n)
            kv = float(sched.kv_cache_usage)
        else:
            started = sum(1 for f in self._inflight.values() if f.started)
            running = min(started, self.capacity)
            kv = 0.0
        return EngineStats(running=running, waiting=n - running, kv_cache_usage=kv)

    async def abort(self, request_id: str) -> None:
        flight = self._inflight.get(request_id)
        if flight is not None:
            flight.abort_requested = True
        if self._llm is not None:
            await self._llm.abort(request_id)

    async def generate(self, req: GenRequest) -> AsyncIterator[Delta]:
        llm = self._llm
        if llm is None:
            if self._closed:
                raise EngineDeadError("engine closed")
            raise RuntimeError("engine not started")
        if llm.errored:
            raise EngineDeadError(str(llm.dead_error))
        check_request(req)
        if req.request_id in self._inflight:
            raise InvalidRequestError(f"duplicate request_id {req.request_id!r}")
        prompt_ids = self._prompt_ids(req.prompt, req.messages)
        n_prompt = len(prompt_ids)
        if n_prompt >= self.max_model_len:
            raise PromptTooLongError(f"prompt has {n_prompt} tokens, max_model_len is {self.max_model_len}")
        all_ids = prompt_ids + list(req.resume_token_ids)
        remaining = min(
            req.max_tokens - len(req.resume_token_ids),
            self.max_model_len - len(all_ids),
        )
        if remaining <= 0:
            yield Delta("", [], n_prompt, "length")
            return
        try:
            params = sampling_params(req.sampling, remaining, len(req.resume_token_ids))
        except (VLLMClientError, ValueError) as exc:
            raise InvalidRequestError(str(exc)) from exc
        flight = self._inflight[req.request_id] = _InFlight()
        top_logprobs = req.sampling.logprobs
        finished = False
        stream = llm.generate(
            TokensPrompt(prompt_token_ids=all_ids),
            params,
            req.request_id,
            priority=req.priority,
        )
        try:
            async for out in stream:
                flight.started = True
                comp = out.outputs[0] if out.outputs else None
                reason = None
                if out.finished:
                    finished = True
                    reason = (comp.finish_reason if comp else None) or "abort"
                elif flight.abort_requested:
                    # abort() raced with the request being added: repeat it
                    await llm.abort(req.request_id)
                yield Delta(
                    text=comp.text if comp else "",
                    token_ids=list(comp.token_ids) if comp else [],
                    prompt_tokens=n_prompt,
                    finish_reason=reason,
                    logprobs=token_logprobs(comp, top_logprobs) if comp and top_logprobs is not None else None,
                )
                if finished:
                    return
            # vLLM ended the stream without a finished output (should not
            # happen); report it as an abort so the consumer never hangs
            finished = True
            yield Delta("", [], n_prompt, "abort")
        except VllmEngineDeadError as exc:
            raise EngineDeadError(str(exc)) from exc
        except VLLMClientError as exc:
            raise InvalidRequestError(str(exc)) from exc
        except Exception as exc:
            if llm.errored:
                raise EngineDeadError(str(llm.dead_error)) from exc
            if isinstance(exc, EngineError):
                raise
            raise EngineError(f"generate failed: {exc!r}") from exc
        finally:
            self._inflight.pop(req.request_id, None)
            if not finished:
                # consumer went away or an error: make sure vLLM forgets it
                with contextlib.suppress(Exception):
                    await stream.aclose()
                if not llm.errored:
                    with contextlib.suppress(Exception):
                        await llm.abort(req.request_id)
