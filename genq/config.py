"""``genq config``: every ``GENQ_*`` variable with its default and meaning, in one table.

The table is generated from the settings classes themselves (a field's comment in the source
is its description), so it cannot drift from the code; ``deploy/README.md`` embeds the
Markdown form and a test checks it is current. Variables are also read from a ``.env`` file
in the working directory.
"""

from __future__ import annotations

import ast
import inspect
import io
import json
import textwrap
import tokenize
from dataclasses import dataclass
from pathlib import Path

from pydantic import AliasChoices
from pydantic_settings import BaseSettings

# Read outside the settings classes: paths used before any settings object exists, and what the
# Python client (genq.Client, which has no settings object: it reads the environment only) and
# `genq submit` use. (name, type, default, meaning, used by)
EXTRA = [
    (
        "GENQ_MODEL_CACHE",
        "path",
        "~/.cache/genq/models",
        "where the default model is converted once",
        "genq up, worker",
    ),
    ("GENQ_URL", "str", "http://127.0.0.1:8000", "the API the Python client and `genq submit` talk to", "client"),
    (
        "GENQ_API_KEY",
        "str",
        "",
        "the key the Python client and `genq submit` send (`genq submit` falls back to the one `genq up` keeps)",
        "client",
    ),
]


@dataclass(frozen=True, slots=True)
class Variable:
    name: str
    type: str
    default: str
    meaning: str
    process: str


def _comments(cls: type) -> dict[str, str]:
    """Field name -> the comment lines just above it plus its trailing comment, from the source."""
    src = textwrap.dedent(inspect.getsource(cls))
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    lines = src.splitlines()
    out: dict[str, str] = {}
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            above: list[str] = []
            n = node.lineno - 1
            while n >= 1 and lines[n - 1].strip().startswith("#") and not lines[n - 1].strip().startswith("# --"):
                above.insert(0, comments.get(n, ""))
                n -= 1
            trailing = [comments[i] for i in range(node.lineno, (node.end_lineno or node.lineno) + 1) if i in comments]
            out[node.target.id] = " ".join(p for p in [*above, *trailing] if p and not p.startswith("noqa"))
    return out


def _default(field: object) -> str:
    factory = getattr(field, "default_factory", None)
    value = factory() if factory is not None else getattr(field, "default", None)
    if value is None:
        return ""
    if hasattr(value, "get_secret_value"):
        return "(secret)"
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value)
    except TypeError:  # e.g. a Path
        return str(value).replace(str(Path.home()), "~")


def variables(cls: type[BaseSettings], process: str, skip: frozenset[str] = frozenset()) -> list[Variable]:
    prefix = str(cls.model_config.get("env_prefix", ""))
    notes: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # a subclass's comment wins
        if issubclass(klass, BaseSettings) and klass is not BaseSettings:
            notes.update(_comments(klass))
    out = []
    for name, field in cls.model_fields.items():
        if name in skip:
            continue
        alias = field.validation_alias
        env = alias.choices[0] if isinstance(alias, AliasChoices) else f"{prefix}{name}"
        shown = "(per process)" if name == "worker_id" else _default(field)
        type_name = (
            str(field.annotation)
            .replace("typing.", "")
            .replace("pydantic.types.", "")
            .replace("<class '", "")
            .replace("'>", "")
        )
        out.append(Variable(str(env).upper(), type_name, shown, notes.get(name, ""), process))
    return out


def all_variables() -> list[Variable]:
    from api.settings import ApiSettings
    from batcher.settings import BatcherSettings, WebhookSettings
    from broker.settings import BrokerSettings
    from worker.settings import WorkerSettings

    shared = variables(BrokerSettings, "api, worker")
    hooks = frozenset(WebhookSettings.model_fields)
    api_only = variables(ApiSettings, "api", skip=frozenset(BrokerSettings.model_fields) | hooks)
    webhooks = variables(WebhookSettings, "api, batcher")

    extra = [Variable(*row) for row in EXTRA]
    batcher_only = variables(BatcherSettings, "batcher", skip=frozenset(ApiSettings.model_fields))
    return [*shared, *api_only, *variables(WorkerSettings, "worker"), *webhooks, *batcher_only, *extra]


def markdown() -> str:
    rows = ["| variable | used by | type | default | meaning |", "|---|---|---|---|---|"]
    for v in all_variables():
        cells = [f"`{v.name}`", v.process, v.type, f"`{v.default}`" if v.default else "", v.meaning]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows) + "\n"


def config_command(markdown_table: bool = False) -> None:
    """Every GENQ_* variable with its default and meaning (also read from ./.env)."""
    import sys

    if markdown_table:
        sys.stdout.write(markdown())
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("variable", "used by", "default", "meaning", title="genq configuration (env or ./.env)")
    for v in all_variables():
        table.add_row(v.name, v.process, v.default, v.meaning)
    Console().print(table)
