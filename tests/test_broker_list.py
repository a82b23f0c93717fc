"""Listing a tenant's jobs: a status filter is exact at any backlog size, and pages walk
the whole history once, newest first, with a cursor that jobs admitted meanwhile do not shift."""

from __future__ import annotations

import asyncio

import pytest

from broker import Broker, JobSpec, JobStatus

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(120)]


def spec(i: int) -> JobSpec:
    return JobSpec(tenant="acme", model="m", messages=[{"role": "user", "content": f"hi {i}"}])


async def admit_many(broker: Broker, n: int) -> list[str]:
    ids: list[str] = []
    for start in range(0, n, 250):
        batch = await asyncio.gather(*(broker.admit(spec(i)) for i in range(start, min(n, start + 250))))
        ids += [a.job_id for a in batch]
    return ids


async def test_status_filter_finds_a_job_behind_5000_newer(broker: Broker) -> None:
    old = (await broker.admit(spec(-1))).job_id
    await broker.cancel(old, "acme")
    newer = await admit_many(broker, 5000)

    found = await broker.list_jobs("acme", JobStatus.CANCELLED, 10)
    assert [j.id for j in found] == [old]  # was []: only the newest 400 were looked at

    page = await broker.job_page("acme", JobStatus.CANCELLED, 10)
    assert [j.id for j in page.jobs] == [old] and not page.has_more and page.next_after is None

    # every queued job exactly once across pages, newest first
    seen: list[str] = []
    after = None
    pages = 0
    while True:
        page = await broker.job_page("acme", JobStatus.QUEUED, 1200, after)
        pages += 1
        seen += [j.id for j in page.jobs]
        assert all(j.status is JobStatus.QUEUED for j in page.jobs)
        if not page.has_more:
            break
        after = page.next_after
        if pages == 2:  # admissions between pages shift nothing
            await admit_many(broker, 30)
    assert len(seen) == len(set(seen)) == 5000 and set(seen) == set(newer)
    assert pages == 5
    created = [j.created_ms for j in await broker.list_jobs("acme", JobStatus.QUEUED, 1000)]
    assert created == sorted(created, reverse=True)


async def test_cursor_of_an_unknown_job_is_refused(broker: Broker) -> None:
    from broker.errors import NotFound

    await admit_many(broker, 3)
    with pytest.raises(NotFound):
        await broker.job_page("acme", None, 10, "job_" + "0" * 32)
