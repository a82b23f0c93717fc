"""API keys: ``Authorization: Bearer <key>``; a key maps to a tenant. Only sha256 hashes are stored.

A key record (``Broker.put_api_key``) is ``{tenant, name, admin, created_ms}``.
The optional bootstrap admin key from settings is compared in memory and never stored.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.errors import bad_request, forbidden, unauthorized
from api.runtime import Runtime, get_runtime, note
from broker.client import Broker
from broker.models import TENANT

KEY_PREFIX = "gq-"
ADMIN_TENANT = "admin"

_bearer = HTTPBearer(auto_error=False, description="An API key made with `genq keys create`.")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_id(key_hash: str) -> str:
    """The public handle of a key: a prefix of its hash (what `genq keys list` shows)."""
    return key_hash[:16]


@dataclass(frozen=True, slots=True)
class Principal:
    tenant: str
    name: str
    admin: bool
    key_id: str


async def create_key(broker: Broker, tenant: str, name: str = "", admin: bool = False) -> str:
    """Store a new key's hash and return the key itself (shown once, never stored)."""
    if not TENANT.match(tenant):
        raise bad_request("tenant must be 1-64 characters of [A-Za-z0-9._-]", "tenant")
    key = new_key()
    record: dict[str, Any] = {"tenant": tenant, "name": name, "admin": admin, "created_ms": time.time_ns() // 10**6}
    await broker.put_api_key(hash_key(key), record)
    return key


async def authenticate(
    request: Request,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    rt: Annotated[Runtime, Depends(get_runtime)],
) -> Principal:
    if creds is None or creds.scheme.lower() != "bearer" or not creds.credentials:
        raise unauthorized("You didn't provide an API key: use `Authorization: Bearer <key>`.")
    key = creds.credentials
    admin_key = rt.settings.admin_key.get_secret_value() if rt.settings.admin_key else None
    if admin_key and hmac.compare_digest(key.encode(), admin_key.encode()):
        principal = Principal(ADMIN_TENANT, "bootstrap", True, "bootstrap")
    else:
        digest = hash_key(key)
        record = await rt.broker.get_api_key(digest)
        if record is None:
            raise unauthorized()
        principal = Principal(
            str(record["tenant"]), str(record.get("name", "")), bool(record.get("admin")), key_id(digest)
        )
    note(request, tenant=principal.tenant)
    return principal


async def require_admin(principal: Annotated[Principal, Depends(authenticate)]) -> Principal:
    if not principal.admin:
        raise forbidden()
    return principal


Auth = Annotated[Principal, Depends(authenticate)]
Admin = Annotated[Principal, Depends(require_admin)]
