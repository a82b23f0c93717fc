"""Which run gives its engine slot to a more urgent job (the policy; :mod:`worker.loop` acts on it).

vLLM's priority scheduler orders the requests waiting in the engine, but frees a running
slot only when the KV cache runs out; so the worker preempts: the least urgent *generating*
run (the most recently started or resumed first: the least work redone) is aborted in the
engine and resumes after its tokens as a new request (:meth:`worker.run.JobRun.preempt`).
"""

from __future__ import annotations

from collections.abc import Iterable

from worker.run import JobRun


def room(runs: Iterable[JobRun], capacity: int) -> tuple[int, int]:
    """(max priority, jobs) a full worker may still claim: work more urgent than its least
    urgent generating runs, one job per such run; (-1, 0) when nothing can be preempted."""
    victims = [r.priority for r in runs if r.preemptible]
    worst = max(victims, default=0)
    if worst == 0:
        return -1, 0
    return worst - 1, min(victims.count(worst), capacity)


def victim_for(run: JobRun, runs: Iterable[JobRun], capacity: int) -> JobRun | None:
    """The run whose slot ``run`` should take, or None: a slot is free, work at least as urgent
    as ``run`` fills the engine by itself, or nothing less urgent is generating."""
    in_engine = [r for r in runs if r.running]
    if len(in_engine) <= capacity:
        return None  # a slot is free for it
    if sum(1 for r in in_engine if r.priority <= run.priority) > capacity:
        return None  # as urgent work alone fills the engine: it waits its turn
    victims = [r for r in in_engine if r.preemptible and r.priority > run.priority]
    return max(victims, key=lambda r: (r.priority, r.segment_started_at), default=None)
