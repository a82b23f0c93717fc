"""Which webhook URLs genq POSTs to: http(s) only, and (unless allowed) public addresses only.

A URL is checked when a job, a batch or a tenant default names it (the API answers 400) and
again before every delivery attempt, since what a name resolves to may change. Refused
unless ``GENQ_WEBHOOKS_ALLOW_PRIVATE``: hosts that are, or resolve to, a private, loopback,
link-local, multicast, reserved or unspecified address (a webhook must not become a way
into the deployment's own network). A delivery connects to the very address it checked
(:func:`pinned`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from enum import StrEnum
from urllib.parse import urlsplit

import httpx

MAX_URL_CHARS = 2048
RESOLVE_TIMEOUT_S = 5.0


class Refusal(StrEnum):
    MALFORMED = "malformed"  # not an absolute http(s) URL with a host
    UNRESOLVABLE = "unresolvable"  # the host has no address (DNS)
    PRIVATE = "private"  # the host is, or resolves to, a non-public address


class UrlRefused(Exception):
    def __init__(self, reason: Refusal, url: str, detail: str = "") -> None:
        super().__init__(f"webhook URL refused ({reason.value}){': ' + detail if detail else ''}")
        self.reason, self.url, self.detail = reason, url, detail


def _public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


async def _addresses(host: str, port: int) -> list[str]:
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(RESOLVE_TIMEOUT_S):
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, TimeoutError, UnicodeError):
        return []
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


async def check_url(url: str, *, allow_private: bool) -> list[str]:
    """The public addresses ``url``'s host resolves to (none checked, ``[]``, with
    ``allow_private``); raises :class:`UrlRefused` unless genq may POST to ``url``."""
    if len(url) > MAX_URL_CHARS or any(c.isspace() for c in url):
        raise UrlRefused(Refusal.MALFORMED, url, "too long or has whitespace")
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as e:
        raise UrlRefused(Refusal.MALFORMED, url, str(e)) from None
    host = parts.hostname
    if parts.scheme not in ("http", "https") or not host:
        raise UrlRefused(Refusal.MALFORMED, url, "needs http:// or https:// and a host")
    if allow_private:
        return []
    try:
        addresses = [str(ipaddress.ip_address(host))]
    except ValueError:
        addresses = await _addresses(host, port)
    if not addresses:
        raise UrlRefused(Refusal.UNRESOLVABLE, url, host)
    for addr in addresses:
        if not _public(ipaddress.ip_address(addr.split("%", 1)[0])):
            raise UrlRefused(Refusal.PRIVATE, url, addr)
    return addresses


def pinned(url: str, addresses: list[str]) -> tuple[httpx.URL, dict[str, str], dict[str, str]]:
    """(URL, headers, httpx extensions) that reach ``url`` at the first of the ``addresses``
    it was checked with, so a name re-resolved between the check and the connection (DNS
    rebinding) cannot lead elsewhere: the host name still goes in ``Host`` and, for https, in
    the TLS server name (SNI and certificate check). No addresses: ``url`` as it is."""
    target = httpx.URL(url)
    if not addresses or not target.host:
        return target, {}, {}
    headers = {"host": target.netloc.decode("ascii")}
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    return target.copy_with(host=addresses[0]), headers, extensions
