"""Prompt token counting in the API process, without vLLM.

A worker registers its model with ``tokenizer=<local folder>`` (see
``Broker.register_model``). The API loads that folder with
``transformers.AutoTokenizer`` once per model, lazily and in a thread (importing
transformers takes seconds), and counts chat prompts exactly as the engine will
see them: ``apply_chat_template(..., add_generation_prompt=True)``.

Without a usable tokenizer the count is a documented over-estimate:
``utf-8 bytes // 2 + 8`` per message (``+ 8`` once for a plain prompt). Typical
text runs 3-5 bytes per token, so this reserves more than the truth for rate
limits and context checks; the engine still enforces the exact context length.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterable, Mapping
from typing import Any

import structlog

log = structlog.get_logger(__name__)

PER_MESSAGE_OVERHEAD = 8


def estimate_tokens(prompt: str | None, messages: list[dict[str, Any]] | None) -> int:
    if messages is None:
        return len((prompt or "").encode()) // 2 + PER_MESSAGE_OVERHEAD
    total = 0
    for m in messages:
        text = str(m.get("content") or "") + str(m.get("role") or "")
        total += len(text.encode()) // 2 + PER_MESSAGE_OVERHEAD
    return total


def _load(folder: str) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never fetch from a hub at run time
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _count(tok: Any, prompt: str | None, messages: list[dict[str, Any]] | None) -> int:
    if messages is not None:
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    else:
        ids = tok(prompt or "")
    if not isinstance(ids, list):  # transformers 5 answers a BatchEncoding
        ids = ids["input_ids"]
    return len(ids)


class TokenCounter:
    """Per-model tokenizers, loaded at first use; a failed load falls back to the estimate."""

    def __init__(self) -> None:
        self._tokenizers: dict[str, Any] = {}  # folder -> tokenizer (None = unusable)
        self._locks: dict[str, asyncio.Lock] = {}

    async def _tokenizer(self, folder: str) -> Any:
        if folder in self._tokenizers:
            return self._tokenizers[folder]
        lock = self._locks.setdefault(folder, asyncio.Lock())
        async with lock:
            if folder not in self._tokenizers:
                try:
                    self._tokenizers[folder] = await asyncio.to_thread(_load, folder)
                    log.info("tokenizer loaded", folder=folder)
                except Exception as e:  # a bad folder must not take requests down  # noqa: BLE001
                    log.warning("tokenizer unusable; estimating prompt tokens", folder=folder, error=repr(e))
                    self._tokenizers[folder] = None
        return self._tokenizers[folder]

    async def preload(self, models: Mapping[str, Mapping[str, Any]], budget_s: float) -> dict[str, Any]:
        """Load now the tokenizers of ``models`` (model -> record, as ``Broker.models`` gives them).

        One folder at a time, each in a thread; no new load starts once ``budget_s`` is spent (the
        one in flight finishes: a thread cannot be cut). A folder that fails falls back to the
        estimate, as at first use. Returns what was done (folders, loaded, skipped, took_s).
        """
        t0 = time.monotonic()
        folders = sorted({str(info["tokenizer"]) for info in models.values() if info.get("tokenizer")})
        loaded, skipped = 0, 0
        for folder in folders:
            if time.monotonic() - t0 >= budget_s:
                skipped += 1
                continue
            loaded += await self._tokenizer(folder) is not None
        return {"folders": len(folders), "loaded": loaded, "skipped": skipped, "took_s": time.monotonic() - t0}

    def cached(self, folders: Iterable[str]) -> bool:
        """Whether every folder's tokenizer is loaded (or known unusable): counting waits for no load."""
        return all(f in self._tokenizers for f in folders)

    async def count(self, model_info: dict[str, Any], prompt: str | None, messages: list[dict[str, Any]] | None) -> int:
        folder = model_info.get("tokenizer")
        tok = await self._tokenizer(str(folder)) if folder else None
        if tok is None:
            return estimate_tokens(prompt, messages)
        try:
            return await asyncio.to_thread(_count, tok, prompt, messages)
        except Exception as e:  # e.g. a template that rejects the roles given  # noqa: BLE001
            log.warning("token count failed; estimating", error=repr(e))
            return estimate_tokens(prompt, messages)
