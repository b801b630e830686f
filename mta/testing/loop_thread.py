"""An event loop in a daemon thread, for test servers that must run beside sync tests and subprocesses."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable
from typing import Any


class LoopThread:
    def __init__(self, name: str) -> None:
        self.name = name
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self, startup: Callable[[], Awaitable[Any]] | None = None, timeout: float = 5.0) -> Any:
        """Start the loop; run `startup()` on it and return its result."""
        loop = asyncio.new_event_loop()
        self.loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name=self.name, daemon=True)
        self._thread.start()
        return self.run(startup(), timeout) if startup is not None else None

    def run(self, coro: Awaitable[Any], timeout: float = 5.0) -> Any:
        assert self.loop is not None, "not started"
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def stop(self, shutdown: Callable[[], Awaitable[Any]] | None = None, timeout: float = 5.0) -> None:
        """Run `shutdown()` (errors ignored), then stop and close the loop."""
        loop, thread = self.loop, self._thread
        if loop is None or thread is None:
            return
        if shutdown is not None:
            with contextlib.suppress(Exception):
                self.run(shutdown(), timeout)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        loop.close()
        self.loop = self._thread = None
