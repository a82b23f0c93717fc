"""Auth: tenants see only their own jobs (404 otherwise), bad/revoked keys 401, admin endpoints 403."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys

import httpx
import pytest
from test_api_support import Stack, auth, make_stack  # noqa: F401 (fixture)

from api.auth import hash_key
from broker.models import TenantLimits

JOB = {"model": "m", "prompt": "hello", "max_tokens": 3}


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "code", "param"}, err
    if code:
        assert err["code"] == code, err
    return err


@pytest.fixture
def stack(make_stack) -> Stack:  # noqa: F811
    return make_stack(worker=False)  # jobs stay queued: cancel and events have something to act on


def test_other_tenants_job_is_not_found_everywhere(stack: Stack) -> None:
    a, b = stack.key("tenant-a"), stack.key("tenant-b")
    with httpx.Client(base_url=stack.url, timeout=10) as h:
        job = h.post("/v1/jobs", json=JOB, headers=auth(a)).json()
        jid = job["id"]
        for method, path in (
            ("GET", f"/v1/jobs/{jid}"),
            ("GET", f"/v1/jobs/{jid}/events"),
            ("DELETE", f"/v1/jobs/{jid}"),
        ):
            err = assert_error(h.request(method, path, headers=auth(b)), 404, "not_found")
            assert jid in err["message"] and "tenant-a" not in err["message"]
        assert h.get("/v1/jobs", headers=auth(b)).json()["data"] == []
        # the same idempotency key in another tenant is another job
        idem = {"Idempotency-Key": "same-key"}
        ja = h.post("/v1/jobs", json=JOB, headers={**auth(a), **idem}).json()["id"]
        jb = h.post("/v1/jobs", json=JOB, headers={**auth(b), **idem}).json()["id"]
        assert ja != jb
        # and A still owns its job, untouched by B's attempts
        mine = h.get(f"/v1/jobs/{jid}", headers=auth(a)).json()
        assert mine["status"] == "queued"
        assert {j["id"] for j in h.get("/v1/jobs", headers=auth(a)).json()["data"]} == {jid, ja}
        assert h.get("/v1/jobs", params={"status": "succeeded"}, headers=auth(a)).json()["data"] == []
        assert h.delete(f"/v1/jobs/{jid}", headers=auth(a)).json()["status"] == "cancelled"
        assert_error(h.delete(f"/v1/jobs/{jid}", headers=auth(a)), 409, "already_terminal")


def test_missing_bad_and_revoked_keys_401(stack: Stack) -> None:
    key = stack.key("acme")
    with httpx.Client(base_url=stack.url, timeout=10) as h:
        for headers in (
            {},
            {"Authorization": "Bearer gq-nope"},
            {"Authorization": "Basic abc"},
            {"Authorization": "Bearer"},
        ):
            for method, path in (
                ("POST", "/v1/jobs"),
                ("GET", "/v1/jobs"),
                ("GET", "/v1/models"),
                ("POST", "/v1/chat/completions"),
                ("GET", "/v1/admin/queues"),
            ):
                r = h.request(method, path, headers=headers, json=JOB)
                assert_error(r, 401, "invalid_api_key")
                assert r.headers["www-authenticate"] == "Bearer"
        assert h.get("/v1/jobs", headers=auth(key)).status_code == 200
        assert stack.call(lambda b: b.delete_api_key(hash_key(key)))
        assert_error(h.get("/v1/jobs", headers=auth(key)), 401, "invalid_api_key")


def test_keys_are_stored_only_as_hashes(stack: Stack) -> None:
    key = stack.key("acme")
    records = stack.call(lambda b: b.api_keys())
    assert hash_key(key) in records
    assert all(key not in h and key not in str(r) for h, r in records.items())


def test_admin_endpoints(stack: Stack) -> None:
    tenant_key = stack.key("acme")
    admin_key = stack.key("ops", admin=True)
    with httpx.Client(base_url=stack.url, timeout=10) as h:
        for path in ("/v1/admin/queues", "/v1/admin/tenants/acme"):
            err = assert_error(h.get(path, headers=auth(tenant_key)), 403, "insufficient_permissions")
            assert err["type"] == "permission_error"
        assert_error(h.put("/v1/admin/tenants/acme", json={"rpm": 1}, headers=auth(tenant_key)), 403)
        for key in (admin_key, stack.admin_key):  # a stored admin key, and the bootstrap key from settings
            queues = h.get("/v1/admin/queues", headers=auth(key))
            assert queues.status_code == 200 and "m" in [q["model"] for q in queues.json()["data"]]
        assert h.get("/v1/admin/tenants/acme", headers=auth(admin_key)).json()["source"] == "defaults"
        put = h.put(
            "/v1/admin/tenants/acme", json={"rpm": 60, "max_queued": 1, "priorities": [5, 9]}, headers=auth(admin_key)
        )
        assert put.status_code == 200
        got = h.get("/v1/admin/tenants/acme", headers=auth(admin_key)).json()
        assert got["source"] == "tenant" and got["limits"]["rpm"] == 60 and got["limits"]["priorities"] == [5, 9]
        assert stack.call(lambda b: b.get_tenant("acme")) == TenantLimits(rpm=60, max_queued=1, priorities=[5, 9])
        # the limits apply at once
        assert h.post("/v1/jobs", json=JOB, headers=auth(tenant_key)).status_code == 202
        assert_error(h.post("/v1/jobs", json=JOB, headers=auth(tenant_key)), 429, "tenant_queue_full")
        prio = h.post("/v1/jobs", json={**JOB, "priority": 0}, headers=auth(tenant_key))
        assert assert_error(prio, 400)["param"] == "priority"
        bad = h.put("/v1/admin/tenants/acme", json={"priorities": [11]}, headers=auth(admin_key))
        assert assert_error(bad, 400)["param"] == "priorities.0"
        assert_error(h.get("/v1/admin/tenants/bad%20name", headers=auth(admin_key)), 400)


def test_keys_cli_create_list_revoke(stack: Stack) -> None:
    env = {**os.environ, "GENQ_REDIS_URL": stack.settings.redis_url, "GENQ_QUEUE": stack.settings.queue}
    genq = [sys.executable, "-m", "genq.cli", "keys"]

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*genq, *args], env=env, capture_output=True, text=True, timeout=60)

    made = run("create", "--tenant", "cli-t", "--name", "laptop", "--rpm", "120", "--priorities", "5-9")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert key.startswith("gq-")
    listed = run("list")
    assert listed.returncode == 0 and "cli-t" in listed.stdout and "laptop" in listed.stdout
    assert key not in listed.stdout
    limits = stack.call(lambda b: b.get_tenant("cli-t"))
    assert limits.rpm == 120 and limits.priorities == [5, 6, 7, 8, 9]
    with httpx.Client(base_url=stack.url, timeout=10) as h:
        assert h.get("/v1/jobs", headers=auth(key)).status_code == 200
        gone = run("revoke", hash_key(key)[:16])
        assert gone.returncode == 0, gone.stderr
        assert_error(h.get("/v1/jobs", headers=auth(key)), 401, "invalid_api_key")
    assert run("revoke", "no-such-key").returncode == 1
    assert run("create", "--tenant", "bad tenant").returncode != 0


@pytest.mark.parametrize("weak", ["x", "hunter2hunter2", "a" * 40, "ab" * 20, "0123456789" * 3])
def test_weak_bootstrap_admin_key_refused_at_start_up(weak: str) -> None:
    from pydantic import ValidationError

    from api.settings import ApiSettings

    with pytest.raises(ValidationError, match="GENQ_ADMIN_KEY is too weak"):
        ApiSettings(admin_key=weak)
    ApiSettings(admin_key="gq-" + secrets.token_urlsafe(32))  # what `genq keys create` makes
    ApiSettings(admin_key=secrets.token_hex(16))


def test_genq_api_with_a_weak_admin_key_exits_with_a_clear_message() -> None:
    env = {**os.environ, "GENQ_ADMIN_KEY": "hunter2hunter2", "GENQ_REDIS_URL": "redis://127.0.0.1:1/0"}
    proc = subprocess.run(
        [sys.executable, "-m", "genq.cli", "api", "--port", "0"], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2, proc.stderr
    assert "GENQ_ADMIN_KEY is too weak" in proc.stderr and "14 characters" in proc.stderr
    assert "hunter2hunter2" not in proc.stderr  # the secret is never echoed
