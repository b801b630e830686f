"""Scheduler: an id scheduled again while its attempt runs is not forgotten (issue 18, item 3).

_pop_due drops the heap entry of an id in flight; its _due entry stayed, so _run_one saw the id
as "already scheduled" and did not reschedule it: the message sat in the spool until a restart.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from mta.scheduler import Scheduler
from mta.spool.store import SpoolStore


async def test_dlv_3_rescheduled_while_in_flight_runs_again(tmp_path: Path) -> None:
    store = SpoolStore(tmp_path / "q")
    store.prepare()
    calls: list[float] = []
    release = asyncio.Event()

    async def deliver(qid: str) -> float | None:
        calls.append(time.time())
        if len(calls) == 1:
            await release.wait()
            return time.time() + 3600  # deferred: next attempt in an hour
        return None

    sched = Scheduler(store, deliver, concurrency=4)
    stop = asyncio.Event()
    runner = asyncio.create_task(sched.run(stop))
    try:
        sched.schedule("Q1", time.time())
        for _ in range(200):
            if calls:
                break
            await asyncio.sleep(0.01)
        assert len(calls) == 1
        sched.schedule("Q1", time.time())  # asked again while the first attempt runs
        await asyncio.sleep(0.3)  # the loop pops that entry while Q1 is in flight
        release.set()
        for _ in range(300):
            if len(calls) == 2:
                break
            await asyncio.sleep(0.01)
        assert len(calls) == 2, "the request made while in flight was lost"
        assert sched.queued == 0  # the second attempt finished the message
    finally:
        stop.set()
        await asyncio.wait_for(runner, 5)


async def test_dlv_3_deferred_message_keeps_its_retry(tmp_path: Path) -> None:
    store = SpoolStore(tmp_path / "q")
    store.prepare()
    nxt = time.time() + 3600

    async def deliver(qid: str) -> float | None:
        return nxt

    sched = Scheduler(store, deliver, concurrency=4)
    stop = asyncio.Event()
    runner = asyncio.create_task(sched.run(stop))
    try:
        sched.schedule("Q2", time.time())
        for _ in range(200):
            if sched.snapshot()[0].get("Q2") == nxt:
                break
            await asyncio.sleep(0.01)
        assert sched.snapshot()[0] == {"Q2": nxt}
    finally:
        stop.set()
        await asyncio.wait_for(runner, 5)
