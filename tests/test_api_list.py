"""GET /v1/jobs: status filter and cursor pages over HTTP (the broker side: test_broker_list)."""

from __future__ import annotations

import httpx
from test_api_support import Stack, auth, make_stack  # noqa: F401 (fixture)

JOB = {"model": "m", "prompt": "hello", "max_tokens": 3}


def test_pages_and_status_filter(make_stack) -> None:  # noqa: F811
    stack: Stack = make_stack(worker=False)
    key = stack.key("acme")
    with httpx.Client(base_url=stack.url, headers=auth(key), timeout=10) as h:
        ids = [h.post("/v1/jobs", json=JOB).json()["id"] for _ in range(3)]
        assert h.delete(f"/v1/jobs/{ids[0]}").status_code == 200

        # (jobs admitted in one millisecond have no order among themselves: compare sets)
        first = h.get("/v1/jobs", params={"limit": 2}).json()
        assert len(first["data"]) == 2 and first["has_more"] is True
        assert [first["first_id"], first["last_id"]] == [j["id"] for j in first["data"]]
        rest = h.get("/v1/jobs", params={"limit": 2, "after": first["next_after"]}).json()
        assert len(rest["data"]) == 1 and rest["has_more"] is False and rest["next_after"] is None
        assert {j["id"] for j in first["data"] + rest["data"]} == set(ids)

        cancelled = h.get("/v1/jobs", params={"status": "cancelled"}).json()
        assert [j["id"] for j in cancelled["data"]] == [ids[0]] and cancelled["has_more"] is False

        for bad in ("nonsense", "job_" + "0" * 32):
            r = h.get("/v1/jobs", params={"after": bad})
            assert r.status_code == 400 and r.json()["error"]["param"] == "after", r.text
