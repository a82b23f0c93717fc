"""The console's page and its static files, served by the API itself: no CDN, no build step.

One HTML page (``/ui``) loads plain ES modules from ``/ui/static/``; they call the
JSON API with the key the user typed, kept in ``sessionStorage`` (gone when the
tab closes) and sent as ``Authorization: Bearer``. The page and the files are not
secret; every answer with data needs the key. A Content-Security-Policy keeps the
page to its own origin, so a bug can't make the browser fetch anything elsewhere.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import RedirectResponse, Response

from api.errors import ApiError

router = APIRouter(include_in_schema=False)

STATIC = files(__package__) / "static"
TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


@cache
def _asset(name: str) -> bytes | None:
    """A file of static/, by plain name only (no path can leave the folder)."""
    if "/" in name or "\\" in name or name.startswith(".") or not any(name.endswith(t) for t in TYPES):
        return None
    f = STATIC / name
    return f.read_bytes() if f.is_file() else None


@cache
def _index() -> bytes:
    return (STATIC / "index.html").read_bytes()


@router.get("/ui")
async def root() -> RedirectResponse:
    return RedirectResponse("ui/", status_code=307)  # relative: right under a proxy's path prefix too


@router.get("/ui/")
async def page() -> Response:
    return Response(_index(), media_type="text/html; charset=utf-8", headers={**HEADERS, "Cache-Control": "no-cache"})


@router.get("/ui/static/{name}")
async def asset(name: str) -> Response:
    body = _asset(name)
    if body is None:
        raise ApiError(404, "Unknown request URL.", code="unknown_url")
    kind = TYPES["." + name.rsplit(".", 1)[-1]]
    return Response(body, media_type=kind, headers={**HEADERS, "Cache-Control": "no-cache"})
