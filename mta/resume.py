"""Background resume of the spool at start-up (issue 18, PERF-4).

`mta serve` listens first; then a low-priority `python -m mta.spool.recovery` reads every envelope
and reports one line per message, which is scheduled as it comes (mta.scheduler keeps any message
from being scheduled twice when new mail or a `sendmail` file is met by both sides). Progress and
the end are logged as `resume` events (state running/finished, counts, seconds).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time

from mta import log
from mta.scheduler import Scheduler
from mta.spool import recovery
from mta.spool.store import SpoolStore

_log = logging.getLogger("mta.app")


class Resume:
    """The background read of the spool at start-up (PERF-4): `mta serve` listens first, then a
    low-priority `python -m mta.spool.recovery` reads every envelope and reports one line per
    message; each is scheduled as it comes (the scheduler keeps any message from being scheduled
    twice when new mail or a `sendmail` file is met by both sides)."""

    PROGRESS_EVERY = 10.0  # seconds between "resume" progress events

    def __init__(self, store: SpoolStore, scheduler: Scheduler) -> None:
        self.store = store
        self.scheduler = scheduler
        self.done = asyncio.Event()
        self.ok = False
        self.counts = {"scheduled": 0, "held": 0, "corrupt": 0, "removed": 0, "skipped": 0}
        self.started = time.monotonic()
        self.seconds: float | None = None

    def _take(self, line: bytes) -> None:
        kind, _, rest = line.decode("ascii", "replace").partition(" ")
        qid, _, detail = rest.partition(" ")
        counts = self.counts
        if kind == recovery.FOUND or kind == recovery.HELD:
            due = float(detail) if kind == recovery.FOUND else None
            if not self.scheduler.found(qid, due):
                counts["skipped"] += 1
            else:
                counts["scheduled" if due is not None else "held"] += 1
        elif kind == recovery.CORRUPT:
            counts["corrupt"] += 1
            _log.error("spool: %s; moved to corrupt/ with its data", detail)
        elif kind == recovery.REMOVED and detail:
            counts["removed"] += 1
            _log.warning("spool: removed %s %s (never acknowledged or already done)", detail, qid)

    async def run(self) -> None:
        """Run the scan to its end; self.ok False when it failed (the caller stops the relay)."""
        code: int | None = None
        end = b""
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "mta.spool.recovery", str(self.store.root), str(os.getpid()),
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                # Its own session: a Ctrl-C to the server's process group is the server's to act
                # on (it ends the scan); the scan dies with the server anyway (PDEATHSIG).
                start_new_session=True)
            assert proc.stdout is not None
            last = self.started
            tail = b""
            try:
                while chunk := await proc.stdout.read(1 << 16):
                    lines = (tail + chunk).split(b"\n")
                    tail = lines.pop()
                    for line in lines:
                        if line.startswith(b"END "):
                            end = line
                        elif line:
                            self._take(line)
                    if time.monotonic() - last >= self.PROGRESS_EVERY:
                        last = time.monotonic()
                        log.event("resume", state="running", seconds=round(last - self.started, 1),
                                  queued=self.scheduler.queued, **self.counts)
                code = await proc.wait()
            finally:
                if proc.returncode is None:  # cancelled: the relay stops
                    proc.kill()
                    await proc.wait()
        except OSError as exc:
            _log.error("cannot start the spool scan: %s", exc)
        finally:
            self.seconds = time.monotonic() - self.started
            self.ok = code == 0 and bool(end)
            self.scheduler.end_scan()
            self.done.set()
        if not self.ok:
            _log.error("spool scan failed (exit status %s); stopping so that a restart reads the spool again", code)
            return
        log.event("resume", state="finished", seconds=round(self.seconds, 2), queued=self.scheduler.queued,
                  **self.counts)
