"""runtime.offload: the mail path's worker threads (issue 18) keep asyncio.to_thread's promises.

Results and exceptions come back to the awaiting coroutine; a cancelled caller does not break
the pool; as many calls run at once as are waiting (a spool put blocks its thread until the
group flush, so 20 concurrent submissions must get 20 threads); a forked child gets its own.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest

from mta import runtime


async def test_result_and_exception_come_back() -> None:
    assert await runtime.offload(sum, [1, 2, 3]) == 6
    assert await runtime.offload(threading.get_ident) != threading.get_ident()  # not on the loop
    with pytest.raises(ZeroDivisionError):
        await runtime.offload(lambda: 1 / 0)


async def test_as_many_calls_run_at_once_as_wait_up_to_the_limit() -> None:
    parties = 20
    barrier = threading.Barrier(parties, timeout=10)  # broken (an exception) unless all 20 run at once
    ids = await asyncio.wait_for(asyncio.gather(*(runtime.offload(lambda: (barrier.wait(), threading.get_ident())[1])
                                                  for _ in range(parties))), 15)
    assert len(set(ids)) == parties
    assert parties <= runtime.IO_THREADS


async def test_idle_threads_are_reused_not_multiplied() -> None:
    for _ in range(50):
        await runtime.offload(time.sleep, 0)
    assert runtime._offload is not None
    before = len(runtime._offload._threads)
    for _ in range(200):
        await runtime.offload(time.sleep, 0)
    assert len(runtime._offload._threads) == before


async def test_a_cancelled_caller_leaves_the_pool_working() -> None:
    started = threading.Event()
    release = threading.Event()

    def slow() -> str:
        started.set()
        release.wait(10)
        return "late"

    task = asyncio.ensure_future(runtime.offload(slow))
    assert await asyncio.to_thread(started.wait, 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    release.set()  # the call finishes after its caller left: its result is dropped quietly
    assert await runtime.offload(str.upper, "ok") == "OK"


def test_a_forked_child_gets_its_own_threads() -> None:
    assert asyncio.run(runtime.offload(str.lower, "A")) == "a"  # the parent has a pool now
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            os.close(read)
            code = 0 if asyncio.run(asyncio.wait_for(runtime.offload(str.lower, "B"), 5)) == "b" else 2
        finally:
            os.write(write, bytes([code]))
            os._exit(code)
    os.close(write)
    try:
        assert os.read(read, 1) == b"\0"
    finally:
        os.close(read)
        os.waitpid(pid, 0)
