"""PERF-4 (issue 18): the scheduler's memory per deferred message, its packed far-future entries,
and the rule that the background scan and the live side never schedule a message twice."""

from __future__ import annotations

import asyncio
import time
import tracemalloc
from pathlib import Path

import pytest

from mta import metrics
from mta.scheduler import HORIZON, NEAR_CAP, Scheduler
from mta.scheduler_far import GRANULE, FarQueue
from mta.spool.store import SpoolStore, id_created, new_id

pytestmark = pytest.mark.req("PERF-4")


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def _never(qid: str) -> float | None:
    raise AssertionError(f"{qid} handed out")


def _sched(tmp_path: Path, clock: Clock) -> Scheduler:
    store = SpoolStore(tmp_path / "q")
    store.prepare()
    return Scheduler(store, _never, concurrency=4, clock=clock)


def test_perf_4_deferred_entries_cost_under_40_bytes_each(tmp_path: Path) -> None:
    now = time.time()
    ids = [new_id(now - i / 1000) for i in range(100_000)]
    sched = _sched(tmp_path, Clock(now))
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i, qid in enumerate(ids):
            sched.schedule(qid, now + 86400 + i % 7200)  # due tomorrow, spread over two hours
        per = (tracemalloc.get_traced_memory()[0] - before) / len(ids)
    finally:
        tracemalloc.stop()
    assert per < 40, f"{per:.0f} bytes per deferred message"  # a heap entry alone costs ~200
    assert sched.queued == len(ids)


def test_perf_4_far_entries_come_back_before_they_are_due(tmp_path: Path) -> None:
    clock = Clock(1_800_000_000.0)
    sched = _sched(tmp_path, clock)
    soon, later = new_id(clock.now - 5), new_id(clock.now - 9)
    sched.schedule(soon, clock.now + 2 * HORIZON)
    sched.schedule(later, clock.now + 100 * HORIZON)
    odd = new_id(clock.now - 1).lower()
    sched.schedule(odd, clock.now + 100 * HORIZON)  # not a packable id: stays in the heap
    assert sched.snapshot()[0] == {soon: clock.now + 2 * HORIZON, later: clock.now + 100 * HORIZON,
                                   odd: clock.now + 100 * HORIZON}
    states, age = sched.queue_state(clock.now, metrics.queue_gauges)
    assert states == {"active": 0, "deferred": 3, "hold": 0} and age == pytest.approx(9, abs=0.01)
    clock.now += HORIZON + GRANULE
    sched._refill(clock.now)
    assert soon in sched._due and later not in sched._due and len(sched._far) == 1
    clock.now += HORIZON
    assert sched._pop_due(clock.now) == soon
    assert sched.queued == 2


def test_perf_4_rescheduling_a_packed_id_supersedes_it(tmp_path: Path) -> None:
    clock = Clock(1_800_000_000.0)
    sched = _sched(tmp_path, clock)
    qid = new_id(clock.now)
    sched.schedule(qid, clock.now + 10 * HORIZON)
    sched.schedule(qid, clock.now + 1)  # e.g. new mail notified again: the later call wins
    clock.now += 11 * HORIZON
    sched._refill(clock.now)
    assert sched._pop_due(clock.now) == qid
    assert sched._pop_due(clock.now) is None  # the packed entry was stale, not handed out again


def test_perf_4_heap_holds_at_most_near_cap(tmp_path: Path) -> None:
    clock = Clock(1_800_000_000.0)
    sched = _sched(tmp_path, clock)
    for i in range(NEAR_CAP + 10):
        sched.schedule(new_id(clock.now - i), clock.now)
    assert len(sched._due) == NEAR_CAP and len(sched._far) == 10
    states, _ = sched.queue_state(clock.now + GRANULE, metrics.queue_gauges)
    assert states["active"] == NEAR_CAP + 10


def test_perf_4_scan_report_after_live_notification_is_ignored(tmp_path: Path) -> None:
    clock = Clock(time.time())
    sched = _sched(tmp_path, clock)
    sched.begin_scan()
    qid = new_id(clock.now)
    sched.add_new(qid, clock.now)  # accepted by the listener first ...
    assert sched.found(qid, clock.now) is False  # ... then met by the scan: skipped
    sched.end_scan()
    assert sched.queued == 1 and len(sched._heap) == 1


def test_perf_4_notification_after_scan_report_is_ignored(tmp_path: Path) -> None:
    clock = Clock(time.time())
    sched = _sched(tmp_path, clock)
    sched.begin_scan()
    qid, old = new_id(clock.now), new_id(clock.now - 86400)
    assert sched.found(qid, clock.now) is True  # the scan met the new file first ...
    assert sched.found(old, clock.now + 86400) is True
    sched.end_scan()
    sched.add_new(qid, clock.now)  # ... its notification comes later: nothing more to do
    assert len(sched._heap) == 1 and sched.queued == 2
    sched.add_new(qid, clock.now + 5)  # a later, real reschedule path is not swallowed
    assert sched._due[qid] == clock.now + 5


def test_perf_4_operator_touch_during_scan_wins(tmp_path: Path) -> None:
    clock = Clock(time.time())
    sched = _sched(tmp_path, clock)
    sched.begin_scan()
    held, deleted = new_id(clock.now - 100), new_id(clock.now - 200)
    sched.forget(held)
    sched.held.add(held)  # `mta queue hold` applied while the scan had not reached it
    sched.forget(deleted)  # `mta queue delete` likewise
    assert sched.found(held, clock.now) is False and sched.found(deleted, clock.now) is False
    assert sched.queued == 0


def test_perf_4_far_queue_discard_and_oldest() -> None:
    far = FarQueue()
    now = 1_800_000_000.0
    ids = [new_id(now - i) for i in range(50)]
    for i, qid in enumerate(ids):
        far.add(qid, now + 3600 + i)
    assert far.oldest() == min(ids)
    assert far.discard(min(ids)) and not far.discard(min(ids))
    assert far.oldest() == sorted(ids)[1] and len(far) == 49
    assert id_created(far.oldest() or "") == pytest.approx(now - 48, abs=0.01)
    taken = far.take(now + 3600 + 100, limit=10)
    assert len(taken) == 10 and len(far) == 39
    assert sorted(far.ids()) == sorted(set(ids) - {min(ids)} - {q for _, q in taken})


async def test_perf_4_scheduler_run_hands_out_found_messages(tmp_path: Path) -> None:
    store = SpoolStore(tmp_path / "q")
    store.prepare()
    got: list[str] = []

    async def deliver(qid: str) -> float | None:
        got.append(qid)
        return None

    sched = Scheduler(store, deliver, concurrency=4)
    sched.begin_scan()
    stop = asyncio.Event()
    task = asyncio.create_task(sched.run(stop))
    ids = [new_id(time.time() - i) for i in range(20)]
    for qid in ids:
        sched.found(qid, time.time())
        sched.add_new(qid, time.time())  # the live notification of the same messages
    sched.end_scan()
    for _ in range(200):
        if len(got) >= len(ids):
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.3)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert sorted(got) == sorted(ids)
