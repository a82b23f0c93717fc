"""CLI for the API: ``genq api`` and ``genq keys``.

Imported by ``genq/cli.py`` at every ``genq`` call: heavy imports stay inside functions.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import typer

keys_app = typer.Typer(no_args_is_help=True, help="Manage API keys (stored only as sha256 hashes).")


def api_command(
    host: Annotated[str | None, typer.Option(help="Bind address (env GENQ_HOST; default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (env GENQ_PORT; default 8000).")] = None,
) -> None:
    """Run the HTTP API (uvicorn, one process)."""
    from api.server import serve
    from broker.logs import configure_logging

    settings = _settings("genq api")
    overrides = {k: v for k, v in (("host", host), ("port", port)) if v is not None}
    settings = settings.model_copy(update=overrides)
    configure_logging(settings.json_logs, settings.log_level)
    serve(settings)


def _settings(command: str) -> Any:
    """The process's ApiSettings; invalid ones (e.g. a GENQ_REDIS_URL genq cannot use) exit 2."""
    from pydantic import ValidationError

    from api.settings import ApiSettings

    try:
        return ApiSettings()
    except ValidationError as e:  # say what is wrong, never echo a secret back
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors(include_input=False))
        typer.echo(f"{command}: bad settings: {problems}", err=True)
        raise typer.Exit(2) from None


def _run(coro_fn: Any) -> Any:
    from broker.client import Broker

    settings = _settings("genq keys")

    async def main() -> Any:
        async with Broker.from_settings(settings) as broker:
            return await coro_fn(broker)

    return asyncio.run(main())


@keys_app.command("create")
def create(
    tenant: Annotated[str, typer.Option(help="The tenant this key acts for.")],
    name: Annotated[str, typer.Option(help="A label for the key.")] = "",
    admin: Annotated[bool, typer.Option("--admin", help="May use /v1/admin endpoints.")] = False,
    rpm: Annotated[int | None, typer.Option(help="Tenant requests per minute (0 = unlimited).")] = None,
    rpm_burst: Annotated[int | None, typer.Option(help="Tenant request burst.")] = None,
    tpm: Annotated[int | None, typer.Option(help="Tenant tokens per minute (prompt + max_tokens reserved).")] = None,
    tpm_burst: Annotated[int | None, typer.Option(help="Tenant token burst.")] = None,
    max_queued: Annotated[int | None, typer.Option(help="Tenant's max queued jobs.")] = None,
    weight: Annotated[float | None, typer.Option(help="Fair-share weight.")] = None,
    priorities: Annotated[str | None, typer.Option(help="Allowed priorities, e.g. '0-9' or '5,9'.")] = None,
    webhook_url: Annotated[
        str | None, typer.Option(help="Tenant's default webhook ('' = none); see `GET /v1/admin/tenants/<t>`.")
    ] = None,
) -> None:
    """Create a key and print it (once: only its hash is stored). Limit flags update the tenant's limits."""
    from api.auth import create_key
    from api.errors import ApiError
    from broker.models import TenantLimits

    given: dict[str, Any] = {
        "rpm": rpm,
        "rpm_burst": rpm_burst,
        "tpm": tpm,
        "tpm_burst": tpm_burst,
        "max_queued": max_queued,
        "weight": weight,
    }
    given = {k: v for k, v in given.items() if v is not None}
    if priorities is not None:
        given["priorities"] = _parse_priorities(priorities)
    if webhook_url is not None:
        given["webhook_url"] = webhook_url

    async def go(broker: Any) -> str:
        if webhook_url:
            from batcher.webhook_urls import UrlRefused, check_url

            try:
                await check_url(webhook_url, allow_private=_settings("genq keys").webhooks_allow_private)
            except UrlRefused as e:
                raise typer.BadParameter(str(e)) from None
        if given:
            current = await broker.get_tenant(tenant) or TenantLimits()
            await broker.set_tenant(tenant, current.model_copy(update=given))
        return await create_key(broker, tenant, name, admin)

    try:
        key = _run(go)
    except ApiError as e:
        raise typer.BadParameter(e.message) from None
    typer.echo(key)
    typer.echo(f"(tenant {tenant}{', admin' if admin else ''}; store it now: it is not shown again)", err=True)


def _parse_priorities(spec: str) -> list[int]:
    out: set[int] = set()
    try:
        for part in spec.split(","):
            lo, _, hi = part.strip().partition("-")
            out.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise typer.BadParameter(f"priorities must look like '0-9' or '0,5,9', got {spec!r}") from None
    if not out or min(out) < 0 or max(out) > 9:
        raise typer.BadParameter("priorities must lie in 0-9")
    return sorted(out)


@keys_app.command("list")
def list_keys() -> None:
    """List keys: id (a hash prefix), tenant, name, admin. No secrets."""
    from rich.console import Console
    from rich.table import Table

    from api.auth import key_id

    keys = _run(lambda broker: broker.api_keys())
    table = Table("id", "tenant", "name", "admin", "created_ms")
    for digest, rec in sorted(keys.items(), key=lambda kv: kv[1].get("created_ms", 0)):
        table.add_row(
            key_id(digest),
            str(rec.get("tenant")),
            str(rec.get("name", "")),
            str(bool(rec.get("admin"))),
            str(rec.get("created_ms", "")),
        )
    Console().print(table)


@keys_app.command("revoke")
def revoke(key: Annotated[str, typer.Argument(help="The key itself, or its id from `genq keys list`.")]) -> None:
    """Revoke a key: requests with it answer 401 at once."""
    from api.auth import hash_key, key_id

    async def go(broker: Any) -> list[str]:
        digests = list(await broker.api_keys())
        match = [d for d in digests if d == hash_key(key)] or [d for d in digests if key_id(d) == key]
        for d in match:
            await broker.delete_api_key(d)
        return match

    removed = _run(go)
    if not removed:
        typer.echo("no such key", err=True)
        raise typer.Exit(1)
    typer.echo(f"revoked {key_id(removed[0])}")
