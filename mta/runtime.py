"""How `mta serve` runs an event loop, shared by the main process and the listener child."""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import os
import signal
import threading
from collections.abc import Callable, Coroutine
from queue import SimpleQueue
from typing import Any, TypeVar

T = TypeVar("T")

IO_THREADS = 32
_early_stop: list[int] = []  # SIGTERMs that arrived before the event loop had its handlers


def catch_early_stop() -> None:
    """Remember a SIGTERM that arrives before `serve` installs its handlers (CTR-4).

    A container's PID 1 ignores signals it has no handler for, so `docker stop` during start-up
    would otherwise hang until SIGKILL; outside a container it would kill us mid-start. Either
    way the stop request now becomes the usual clean stop once the loop runs.
    """
    signal.signal(signal.SIGTERM, lambda signum, frame: _early_stop.append(signum))


def forget_early_stop() -> None:
    """In the forked listener child: SIGTERM means "die" again until its loop handles it."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _early_stop.clear()


def early_stop_requested() -> bool:
    return bool(_early_stop)


def run(main: Coroutine[Any, Any, int]) -> int:
    """Run `main` on uvloop when it is installed, else on asyncio's own loop."""
    try:
        import uvloop  # type: ignore[import-not-found]
    except ImportError:
        return asyncio.run(main)
    return int(uvloop.run(main))


def use_io_threads(loop: asyncio.AbstractEventLoop) -> None:
    """The default executor (asyncio.to_thread) with IO_THREADS threads instead of asyncio's 6:
    the spool's calls off the mail path (journal upkeep, queue reads for the HTTP API), the
    TLS-RPT and policy stores (SQLite) and report signing block too. The mail path (put, update,
    remove, cold reads) uses `offload`."""
    loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(max_workers=IO_THREADS,
                                                                    thread_name_prefix="mta-io"))


class _Offload:
    """Worker threads for the spool's blocking calls on the hot path (`offload`).

    asyncio.to_thread builds a concurrent.futures.Future per call (a Condition and an RLock),
    chains it to an asyncio future and copies the context: a profile of the listener showed about
    a tenth of its event loop's time there (issue 18). Here a call is one SimpleQueue put and
    one call_soon_threadsafe. Like the executor it grows to `limit` threads when none is idle,
    since a put blocks its thread until the group flush (20 concurrent submissions need 20).
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._queue: SimpleQueue[tuple[Any, ...] | None] = SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def submit(self, loop: asyncio.AbstractEventLoop, fut: asyncio.Future[Any], fn: Callable[..., Any],
               args: tuple[Any, ...]) -> None:
        self._queue.put((loop, fut, fn, args))
        if self._idle.acquire(timeout=0):
            return  # an idle thread will take it
        with self._lock:
            if len(self._threads) < self._limit:
                thread = threading.Thread(target=self._work, name=f"mta-io-{len(self._threads)}", daemon=True)
                self._threads.append(thread)
                thread.start()

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            loop, fut, fn, args = item
            del item
            try:
                result, error = fn(*args), None
            except BaseException as exc:
                result, error = None, exc
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits for this any more
                loop.call_soon_threadsafe(_settle, fut, result, error)
            del loop, fut, fn, args, result, error
            self._idle.release()

    def stop(self, timeout: float = 10.0) -> None:
        """Let running calls finish (at exit: a spool write is not cut short needlessly)."""
        with self._lock:
            threads, self._threads = self._threads, []
        for _ in threads:
            self._queue.put(None)
        for thread in threads:
            thread.join(timeout)


def _settle(fut: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if fut.cancelled():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


_offload: _Offload | None = None


async def offload(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` in a worker thread (see _Offload); no context copy, unlike asyncio.to_thread."""
    return await offload_soon(fn, *args)


def offload_soon(fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
    """`offload` as a future, for callers that settle it from a done callback (no task)."""
    global _offload
    if _offload is None:
        _offload = _Offload(IO_THREADS)
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()
    _offload.submit(loop, fut, fn, args)
    return fut


def _forget_offload() -> None:
    global _offload
    _offload = None  # a forked child has none of its parent's threads


def _stop_offload() -> None:
    if _offload is not None:
        _offload.stop()


os.register_at_fork(after_in_child=_forget_offload)
atexit.register(_stop_offload)
