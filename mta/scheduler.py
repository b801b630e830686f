"""The scheduler: a heap of (next_attempt, queue id), woken by new mail, timers and ctl/ requests.

Rule: finding due work costs O(due * log n): the heap holds only (time, id) pairs, never whole
messages, so 100,000 deferred messages cost a few MB and a tick touches only what is due.
Stale heap entries (superseded by a later schedule() of the same id) are skipped lazily.
A message is never handled by two tasks at once (`_inflight`).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
from collections.abc import Awaitable, Callable

from mta import log
from mta.errors import SpoolError
from mta.spool import control
from mta.spool.store import SpoolStore

_log = logging.getLogger("mta.scheduler")

CTL_POLL = 0.25  # seconds between looks at ctl/ (flush acts on a running serve within a second)


class Scheduler:
    def __init__(self, store: SpoolStore, deliver: Callable[[str], Awaitable[float | None]], concurrency: int,
                 clock: Callable[[], float] = time.time, on_flush: Callable[[], None] | None = None) -> None:
        self.store = store
        self.deliver = deliver
        self.clock = clock
        self.on_flush = on_flush  # e.g. forget unreachable hosts: a flush overrides that delay (SMTP-37)
        self._heap: list[tuple[float, str]] = []
        self._due: dict[str, float] = {}
        self._inflight: set[str] = set()
        self._pending_ctl: list[dict[str, str | None]] = []
        self.held: set[str] = set()  # parked by the operator (for the queue gauges)
        self._slots = asyncio.Semaphore(concurrency)
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    def schedule(self, qid: str, due: float) -> None:
        """(Re)schedule `qid` at `due`; the latest call wins."""
        self._due[qid] = due
        heapq.heappush(self._heap, (due, qid))
        if self._heap[0][1] == qid:
            self._wake.set()

    def forget(self, qid: str) -> None:
        self._due.pop(qid, None)

    def request(self, op: str, qid: str | None) -> None:
        """An operator request from this process (the HTTP API): applied like a ctl/ file, at the
        next look at ctl/, but without writing one (it must work on a full disk too)."""
        if op not in control.OPS:
            raise ValueError(f"unknown operation {op}")
        self._pending_ctl.append({"op": op, "id": qid})

    def snapshot(self) -> tuple[dict[str, float], set[str], set[str]]:
        """(due time per scheduled id, ids in flight, held ids): copies, for the queue gauges."""
        return dict(self._due), set(self._inflight), set(self.held)

    @property
    def queued(self) -> int:
        return len(self._due)

    def _pop_due(self, now: float) -> str | None:
        while self._heap and self._heap[0][0] <= now:
            due, qid = heapq.heappop(self._heap)
            if self._due.get(qid) != due:
                continue  # superseded entry
            if qid in self._inflight:
                # Already running: look again right after it finishes (_run_one reschedules).
                continue
            del self._due[qid]
            return qid
        return None

    async def _run_one(self, qid: str) -> None:
        try:
            nxt = await self.deliver(qid)
        except asyncio.CancelledError:
            raise
        except Exception:
            _log.exception("unexpected error delivering %s; retrying in 60 s", qid)
            nxt = self.clock() + 60
        finally:
            self._inflight.discard(qid)
            self._slots.release()
        if nxt is None:
            return
        # A schedule() of this id while it ran (a second notification, a DSN, the API) left an
        # entry in _due whose heap entry _pop_due dropped: push it again (the earlier time wins),
        # or the message would sit in the spool unscheduled until the next restart (issue 18).
        asked = self._due.get(qid)
        self.schedule(qid, nxt if asked is None else min(asked, nxt))

    def _apply_ctl(self) -> None:
        reqs = self._pending_ctl + control.take_requests(self.store)
        self._pending_ctl = []
        now = self.clock()
        for req in reqs:
            op, qid = str(req["op"]), req.get("id")
            if op == "new":
                self._schedule_new(qid)
                continue
            if op == "flush" and self.on_flush is not None:
                self.on_flush()
            ids = [qid] if qid else list(self._due) if op == "flush" else self.store.ids()
            for one in ids:
                if one in self._inflight:
                    self._pending_ctl.append({"op": op, "id": one})
                    continue
                try:
                    meta = self.store.load_sync(one)
                except Exception:
                    continue
                new = control.apply_to_meta(meta, op, now)
                try:
                    if new is None:
                        self.store._discard(one)
                    else:
                        self.store._update_sync(new)
                except (OSError, SpoolError) as exc:
                    # A full or broken disk must not stop the scheduler; the operator sees why.
                    _log.error("queue %s %s failed: %s", op, one, exc)
                    continue
                if new is None:
                    self.forget(one)
                    self.held.discard(one)
                    log.event("deleted", queue_id=one)
                    continue
                due = new.next_due()
                if new.held:
                    self.forget(one)
                    self.held.add(one)
                    log.event("held", queue_id=one)
                    continue
                self.held.discard(one)
                if due is not None:
                    self.schedule(one, due)

    def _schedule_new(self, qid: str | None) -> None:
        """A message `sendmail` stored while we run: schedule it (its state is already right)."""
        if not isinstance(qid, str) or not qid.isalnum() or qid in self._due or qid in self._inflight:
            return
        try:
            meta = self.store.load_sync(qid)
        except Exception as exc:  # gone already or unreadable: the start-up scan judges it next time
            _log.warning("new message %s: %s", qid, exc)
            return
        due = meta.next_due()
        if due is not None and not meta.held:
            self.schedule(qid, due)

    async def run(self, stop: asyncio.Event) -> None:
        """Hand due messages to tasks until `stop` is set; then wait for in-flight work."""
        last_ctl = 0.0
        while not stop.is_set():
            now = self.clock()
            if now - last_ctl >= CTL_POLL:
                last_ctl = now
                # Operator requests are rare and small: handled inline, between hand-outs.
                self._apply_ctl()
            started = 0
            while not stop.is_set() and started < 1000:
                if self._slots.locked():
                    break
                qid = self._pop_due(now)
                if qid is None:
                    break
                await self._slots.acquire()
                self._inflight.add(qid)
                task = asyncio.create_task(self._run_one(qid))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                started += 1
            if started >= 1000:
                await asyncio.sleep(0)
                continue
            timeout = CTL_POLL
            if self._heap and not self._slots.locked():
                timeout = max(0.0, min(timeout, self._heap[0][0] - self.clock()))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                if self._slots.locked():
                    # All slots busy: wait for one to free up (or a short tick for ctl/).
                    await asyncio.wait_for(self._acquire_release(), timeout=CTL_POLL)
                else:
                    await asyncio.wait_for(self._wake.wait(), timeout=timeout)

    async def _acquire_release(self) -> None:
        await self._slots.acquire()
        self._slots.release()

    async def drain(self, timeout: float) -> None:
        """Let in-flight attempts finish for up to `timeout`, then cancel the rest (their mail stays queued)."""
        if self._tasks:
            _done, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
