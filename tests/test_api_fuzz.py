"""Schemathesis against /openapi.json of a live server (with a worker): no 5xx, every 4xx in the OpenAI shape.

Every operation is fuzzed with schema-conforming (positive) and schema-violating
(negative) cases; the test counts the requests actually sent and needs >= 500.
"""

from __future__ import annotations

import json
from collections import Counter

import httpx
import pytest
import schemathesis
import structlog
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from test_api_support import Stack, auth, make_stack  # noqa: F401 (fixture)

log = structlog.get_logger(__name__)
EXAMPLES_PER_MODE = 40


def check_response(case: schemathesis.Case, status: int, content_type: str, body: bytes) -> None:
    where = f"{case.method} {case.formatted_path} -> {status}: {body[:300]!r}"
    assert status < 500, where
    if 400 <= status < 500:
        assert content_type.startswith("application/json"), where
        err = json.loads(body)["error"]
        assert set(err) == {"message", "type", "code", "param"}, where
        assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str), where


def steer(case: schemathesis.Case, aim: bool, job_id: str) -> schemathesis.Case:
    if aim:
        if isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = "m"
        if case.path_parameters and "job_id" in case.path_parameters:
            case.path_parameters["job_id"] = job_id
    return case


@pytest.mark.timeout(900)
def test_fuzz_openapi(make_stack) -> None:  # noqa: F811
    # small max_tokens so generated jobs finish quickly on the simulated worker
    stack: Stack = make_stack(max_tokens_limit=16, default_max_tokens=8, sync_timeout_s=60)
    key = stack.key("fuzz")
    schema = schemathesis.openapi.from_url(stack.url + "/openapi.json")
    sent: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    done_job = httpx.post(
        stack.url + "/v1/jobs", json={"model": "m", "prompt": "hi", "max_tokens": 2}, headers=auth(key)
    ).json()["id"]
    for result in schema.get_all_operations():
        op = result.ok()
        bearer = stack.admin_key if op.path.startswith("/v1/admin") else key
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            strategy = op.as_strategy(generation_mode=mode, headers={"Authorization": f"Bearer {bearer}"})
            # Random strings almost never name the served model or a real job: steer half the cases there
            # so admission, the worker, streaming and job views are fuzzed too, not only the 404 paths.
            strategy = st.tuples(strategy, st.booleans()).map(lambda pair: steer(*pair, job_id=done_job))

            @given(case=strategy)
            @settings(
                max_examples=EXAMPLES_PER_MODE,
                deadline=None,
                database=None,
                derandomize=True,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            def run(case: schemathesis.Case) -> None:
                resp = case.call(timeout=60)
                sent[f"{case.method} {case.path}"] += 1
                statuses[resp.status_code] += 1
                check_response(case, resp.status_code, resp.headers.get("content-type", [""])[0], resp.content)

            try:
                run()
            except Unsatisfiable:  # nothing to violate (e.g. GET /healthz has no parameters)
                assert mode is GenerationMode.NEGATIVE, op.label
    total = sum(sent.values())
    log.info("fuzz run", requests=total, statuses=dict(sorted(statuses.items())), per_operation=dict(sent))
    assert total >= 500, (total, sent)
    assert any(400 <= s < 500 for s in statuses) and any(s < 300 for s in statuses), statuses
