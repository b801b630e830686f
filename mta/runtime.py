"""How `mta serve` runs an event loop, shared by the main process and the listener child."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Coroutine
from typing import Any

IO_THREADS = 32


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
