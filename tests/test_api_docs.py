"""/docs and /redoc load with no network: every URL the pages reference is served by the API itself."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.settings import ApiSettings

# src= / href= / spec-url= attributes, and the spec URL in Swagger UI's inline script
REFERENCE = re.compile(r"""(?:src|href|spec-url)=["']([^"']+)["']|\burl: ?['"]([^'"]+)['"]""")
CONTENT_TYPES = {".js": "javascript", ".css": "text/css", ".png": "image/png", ".json": "application/json"}


@pytest.fixture
def client() -> TestClient:
    # No lifespan (no `with`): the pages and assets need no Redis.
    return TestClient(create_app(ApiSettings()))


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_reference_only_same_origin_assets_that_load(client: TestClient, page: str) -> None:
    r = client.get(page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "://" not in r.text, "the page names another origin (a CDN, Google Fonts, a validator)"
    refs = [a or b for a, b in REFERENCE.findall(r.text)]
    assert len(refs) >= 3, refs  # the script, the favicon and the spec at least (plus the CSS for Swagger UI)
    assert "/openapi.json" in refs
    for ref in refs:
        assert ref.startswith("/") and not ref.startswith("//"), ref
        asset = client.get(ref)
        assert asset.status_code == 200, ref
        assert len(asset.content) > 0
        for suffix, kind in CONTENT_TYPES.items():
            if ref.endswith(suffix):
                assert kind in asset.headers["content-type"], (ref, asset.headers["content-type"])


def test_swagger_ui_renders_openapi_31_without_the_online_validator(client: TestClient) -> None:
    page = client.get("/docs").text
    assert '"validatorUrl": null' in page
    assert client.get("/openapi.json").json()["openapi"].startswith("3.1")
    # Swagger UI 4 cannot render OpenAPI 3.1; the bundle served must be Swagger UI 5.
    bundle = client.get("/docs/assets/swagger-ui-bundle.js").text
    assert re.search(r'"5\.\d+\.\d+"', bundle)
    assert client.get("/docs/oauth2-redirect").status_code == 200
    assert client.get("/docs/assets/no-such-file.js").status_code == 404
