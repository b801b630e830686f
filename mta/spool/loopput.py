"""The submission child's put on its own event loop: one thread hop per batch, not per message.

Why (issue 18, target 3): a put in a worker thread (open, write, close, the journal append, the
group fdatasync, the rename) takes the GIL back after each of its syscalls, and on a busy machine
each of those hand-overs waits for the event loop thread and then for a CPU. Measured under the
benchmark's load: the put took 7-9 ms in its thread while its fdatasync took 1.4 ms, and the loop
saw 13-14 ms from hand-off to result.

Here the page-cache writes (the tmp file, the journal record, the rename: tens of microseconds,
no flush) run on the loop, and only the shared fdatasync goes to a thread (`LoopFlush`), once
per batch. The order of the steps, and so the durability argument of journal.py, is unchanged:
tmp file, record, a flush that started after the record was written, rename, then the 250.
Opening a new segment (a 4 MiB preallocation and two flushes) still runs in a thread. This is
the journal's only put: the submission child is its only writer, and its puts all come here.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from mta import runtime
from mta.spool.state import MessageMeta

if TYPE_CHECKING:  # both import this module
    from mta.spool.journal import JournalWriter
    from mta.spool.store import SpoolStore


class LoopFlush:
    """Group commit for callers on one event loop.

    `await sync()` returns once a flush that STARTED after the call has finished (or raises its
    OSError): callers arriving while a flush runs wait for the next one, which covers them all.
    Only the flush itself runs in a worker thread; the bookkeeping is the loop's, so no lock.
    """

    def __init__(self, flush: Callable[[], None]) -> None:
        self._flush = flush
        self._asked: list[asyncio.Future[None]] = []
        self._running = False
        self.flushes = 0  # how many were run (tests: one per batch)

    async def sync(self) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._asked.append(fut)
        if not self._running:
            self._start()
        await fut

    def _start(self) -> None:
        batch, self._asked = self._asked, []
        self._running = True
        self.flushes += 1
        runtime.offload_soon(self._flush).add_done_callback(lambda done: self._finished(done, batch))

    def _finished(self, done: asyncio.Future[None], batch: list[asyncio.Future[None]]) -> None:
        self._running = False
        error = OSError("the flush was cancelled") if done.cancelled() else done.exception()
        for fut in batch:
            if fut.done():  # its caller went away (a cut connection): nothing to tell
                continue
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(None)
        if self._asked:
            self._start()


async def put_journaled(store: SpoolStore, journal: JournalWriter, meta: MessageMeta, data: bytes,
                        reserve: int) -> str:
    """tmp file (no flush), journal record, the segment's group fdatasync, rename (journal.py);
    returns the segment name. Raises SpoolError; then nothing is left behind and the record is
    never replayed."""
    envelope = store._stage(meta, data, reserve)
    try:
        if journal.fits(envelope, data):
            seg = journal.append(envelope, data)
        else:  # a new segment: preallocation and flushes, never on the loop
            seg = await runtime.offload(journal.append, envelope, data)
    except OSError as exc:
        raise store._refused(meta.id, exc) from None
    try:
        try:
            await seg.sync.sync()  # one LoopFlush per segment: it covers its own file's records
        finally:
            journal.release(seg)
        os.rename(store._tmp_mail(meta.id), store.mail_path(meta.id))
    except OSError as exc:
        raise store._refused(meta.id, exc, journal, seg.name) from None
    return seg.name
