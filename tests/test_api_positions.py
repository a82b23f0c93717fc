"""Queue positions stay honest under per-tenant fairness: the arrival-order position is labelled an
estimate whenever other jobs share the priority, with bounds that the real claim order respects."""

from __future__ import annotations

import httpx
from test_api_support import HandWorker, Stack, auth, make_stack  # noqa: F401 (fixture)


def test_positions_are_labelled_and_bounded(make_stack) -> None:  # noqa: F811
    stack: Stack = make_stack(worker=False)
    stack.call(lambda b: b.register_model("hand", 4096))
    worker = HandWorker(stack, "hand")
    job = {"model": "hand", "prompt": "x", "max_tokens": 4}
    with (
        httpx.Client(base_url=stack.url, headers=auth(stack.key("big")), timeout=30) as big,
        httpx.Client(base_url=stack.url, headers=auth(stack.key("small")), timeout=30) as small,
    ):
        backlog = [big.post("/v1/jobs", json=job).json()["id"] for _ in range(8)]
        mine = small.post("/v1/jobs", json=job).json()
        urgent = small.post("/v1/jobs", json=job, headers={"X-Priority": "2"}).json()
        batch = small.post("/v1/jobs", json=job, headers={"X-Priority": "9"}).json()

        # The small tenant's job arrived after 8 of another tenant's, and the urgent one (priority 2)
        # overtook it: 9 ahead in priority + arrival order, but the fair scheduler runs it after the
        # urgent one and one of the big tenant's (both tenants start level; the tie goes to "big").
        view = small.get(f"/v1/jobs/{mine['id']}").json()
        assert view["queue_position"] == 2 and view["queue_position_kind"] == "estimate"
        assert view["queue_position_range"] == {"min": 1, "max": 9}
        assert "warning" not in view  # the hand worker is live
        # alone at its priority: exact, whatever the tenants
        assert (urgent["queue_position"], urgent["queue_position_kind"]) == (0, "exact")
        assert urgent["queue_position_range"] == {"min": 0, "max": 0}
        assert (batch["queue_position"], batch["queue_position_kind"]) == (10, "exact")
        assert small.get("/v1/jobs").json()["data"][0]["queue_position"] is None  # lists compute none

        # The claim order respects the bounds given before it (and shows why 8 was only an estimate).
        order = []
        while len(order) < 11:
            [lease] = worker.claim()
            order.append(lease.id)
        ahead = order.index(mine["id"])
        assert view["queue_position_range"]["min"] <= ahead <= view["queue_position_range"]["max"]
        assert ahead == view["queue_position"] == 2, "the estimate is the fair scheduler's real order"
        assert order[0] == urgent["id"] and order[-1] == batch["id"] and set(order[1:-1]) == {*backlog, mine["id"]}
        # claimed: no position any more
        running = small.get(f"/v1/jobs/{mine['id']}").json()
        assert running["status"] == "running" and running["queue_position"] is None
        assert running["queue_position_kind"] is None and running["eta_s"] is None
