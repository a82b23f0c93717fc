"""vLLM engine arguments given as ``key=value`` text, read by vLLM's own command-line parser.

genq keeps no list of vLLM's engine arguments: the parser is the one ``vllm serve``
builds (``AsyncEngineArgs.add_cli_args`` on a ``FlexibleArgumentParser``), so every
argument of the installed vLLM is reachable (prefix caching, quantization, KV-cache
dtype, speculative decoding, ...) with vLLM's own types, choices and JSON forms, and
a newer vLLM brings its new arguments along.

- Keys are ``AsyncEngineArgs`` field names; dashes and a leading ``--`` are accepted
  (``enable-prefix-caching``), and so is vLLM's dotted form for JSON-valued arguments
  (``compilation_config.mode=3``).
- Values are the text vLLM's command line takes: ``true``/``false`` for switches (an
  empty value is ``true``), ``None`` for an optional value, a JSON list (or a single
  item) for lists, JSON for configs; ``1k``-style sizes where vLLM takes them.
- Each argument is parsed on its own, so an error names it.  A key vLLM does not
  know, a value its parser refuses, or an argument genq must set itself raises
  :class:`EngineArgsError` before any engine is built.

Precedence (see :mod:`worker.settings`): arguments that are also genq settings
(:data:`GENQ_SETTINGS`: ``max_num_seqs``, ``max_model_len``, ...) are folded into
those settings by :meth:`worker.settings.WorkerSettings.engine_settings`, and a
conflict between the two is an error; every other argument overrides what genq
passes vLLM by default; :data:`RESERVED` arguments are refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import json
from collections.abc import Mapping
from typing import Any, NoReturn

from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.utils.argparse_utils import FlexibleArgumentParser

from worker.engine.base import VLLM_SETTING_FIELDS, EngineArgsError, engine_arg_key

# AsyncEngineArgs fields that are also genq settings (same names, flags and GENQ_WORKER_* variables).
GENQ_SETTINGS = frozenset(VLLM_SETTING_FIELDS)

# Fields genq must set itself, with the reason given to whoever tries.
RESERVED = {
    "scheduling_policy": "genq's priorities (0-9, lower first) need vLLM's priority scheduler",
    "skip_tokenizer_init": "genq renders prompts and counts their tokens with the engine's tokenizer",
}

_TRUE = {"", "1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class _RefusedByParser(Exception):
    pass


class _Parser(FlexibleArgumentParser):
    """vLLM's parser, raising instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise _RefusedByParser(message)


@functools.cache
def _parser() -> tuple[_Parser, dict[str, argparse.Action]]:
    # vLLM's FlexibleArgumentParser.__init__(*args, **kwargs) carries no annotations
    parser = _Parser(prog="--engine-arg", add_help=False, allow_abbrev=False)  # type: ignore[no-untyped-call]
    AsyncEngineArgs.add_cli_args(parser)
    fields = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    actions = {
        a.dest: a for a in parser._actions if a.dest in fields and any(o.startswith("--") for o in a.option_strings)
    }
    return parser, actions


def _switch(key: str, text: str) -> bool:
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise EngineArgsError(f"engine argument {key}: expected true or false, got {text!r}")


def _tokens(key: str, text: str, action: argparse.Action) -> list[str]:
    """The command-line tokens of one ``key=text`` for vLLM's parser."""
    opt = next(o for o in action.option_strings if o.startswith("--"))
    sub = key[len(action.dest) :]  # "" or vLLM's dotted ".field"
    if sub:
        return [f"{opt}{sub}={text}"]
    if isinstance(action, argparse.BooleanOptionalAction):
        return [opt if _switch(key, text) else "--no-" + opt.removeprefix("--")]
    if action.nargs == 0:  # store_true and the like
        return [opt] if _switch(key, text) else []
    if action.nargs in ("+", "*") or isinstance(action.nargs, int):
        items: Any = [text]
        if text.lstrip().startswith("["):
            try:
                items = json.loads(text)
            except json.JSONDecodeError as e:
                raise EngineArgsError(f"engine argument {key}: not a JSON list: {e}") from None
        return [opt, *(str(i) for i in items)]
    if action.nargs == "?":
        return [opt] if text == "" else [f"{opt}={text}"]
    return [f"{opt}={text}"]


def _unknown(key: str, known: list[str]) -> EngineArgsError:
    import vllm

    close = difflib.get_close_matches(key, known, n=3, cutoff=0.8)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    return EngineArgsError(
        f"unknown engine argument {key!r}{hint}: not an engine argument of vLLM {vllm.__version__} "
        "(the AsyncEngineArgs fields `vllm serve --help=all` lists)"
    )


def read_engine_args(args: Mapping[str, str]) -> dict[str, Any]:
    """``AsyncEngineArgs`` keyword arguments for ``args`` (key -> text), each read by vLLM's parser."""
    parser, actions = _parser()
    by_field: dict[str, dict[str, str]] = {}
    for raw_key, text in args.items():
        key = engine_arg_key(raw_key)
        name = key.partition(".")[0]
        if name in RESERVED:
            raise EngineArgsError(f"engine argument {name} is set by genq: {RESERVED[name]}")
        if name not in actions:
            raise _unknown(name, sorted(actions))
        by_field.setdefault(name, {})[key] = text
    values: dict[str, Any] = {}
    for name, given in by_field.items():
        tokens = [t for key, text in given.items() for t in _tokens(key, text, actions[name])]
        try:
            namespace = parser.parse_args(tokens)
        except (_RefusedByParser, ValueError, TypeError) as e:
            shown = ", ".join(f"{k}={v}" for k, v in given.items())
            raise EngineArgsError(f"engine argument {shown}: {e}") from None
        values[name] = getattr(namespace, name)
    return values


def split_engine_args(args: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Check ``args``; return the genq settings among them (typed) and the rest (as given)."""
    values = read_engine_args(args)
    settings = {name: v for name, v in values.items() if name in GENQ_SETTINGS}
    names = settings.get("served_model_name")
    if names is not None:
        if len(names) != 1:
            raise EngineArgsError(f"engine argument served_model_name: a worker serves one name (a queue), got {names}")
        settings["served_model_name"] = names[0]
    if settings.get("max_model_len") == -1:
        raise EngineArgsError("engine argument max_model_len: genq needs a number (it fits max_tokens to it), not auto")
    normalised = {engine_arg_key(k): v for k, v in args.items()}
    rest = {k: v for k, v in normalised.items() if k.partition(".")[0] not in GENQ_SETTINGS}
    return settings, rest
