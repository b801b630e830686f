"""How `mta serve` runs an event loop, shared by the main process and the listener child."""

from __future__ import annotations

import asyncio
import concurrent.futures
import signal
from collections.abc import Coroutine
from typing import Any

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
    """Spool writes block in fsync; with asyncio's default 6 threads, 20 concurrent submissions
    would queue for a thread. More threads let the file system batch concurrent fsyncs."""
    loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(max_workers=IO_THREADS,
                                                                    thread_name_prefix="mta-io"))
