"""The scheduler: a heap of (next_attempt, queue id), woken by new mail, timers and ctl/ requests.

Rule: finding due work costs O(due * log n): the heap holds only (time, id) pairs, never whole
messages, and a tick touches only what is due. Stale heap entries (superseded by a later
schedule() of the same id) are skipped lazily. A message is never handled by two tasks at once
(`_inflight`).

Memory (issue 18, PERF-4): a heap entry costs about 200 bytes, so entries due more than HORIZON
ahead (and any beyond NEAR_CAP entries) go to a packed FarQueue at 19 bytes each; they come back
into the heap shortly before they fall due. 1,000,000 deferred messages cost about 20 MB.

Background resume (PERF-4): `mta serve` listens before the spool has been read; the scan
(mta.spool.recovery) hands what it finds to `found()` while new mail arrives through `add_new()`.
Each message must be scheduled exactly once, whichever side sees it first:
- an id any live path (new mail, a DSN, an operator request, a finished attempt) touched while
  the scan runs is the live side's: the scan's later report of it is ignored;
- an id the scan reported first and which is recent (it may be mail accepted since the start)
  is remembered, and its notification, when it comes, is ignored.
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
from mta.scheduler_far import FarQueue, packable
from mta.spool import control
from mta.spool.store import SpoolStore, id_created

_log = logging.getLogger("mta.scheduler")

CTL_POLL = 0.25  # seconds between looks at ctl/ (flush acts on a running serve within a second)
HORIZON = 300.0  # entries due further ahead than this wait in the packed FarQueue
NEAR_CAP = 50_000  # at most this many entries in the heap; more wait (packed) in the FarQueue
RECENT = 600.0  # ids the scan finds that are younger than this (at scan start) may still be notified
FORGET_RECENT_AFTER = 120.0  # seconds after the scan until those ids are forgotten


class Scheduler:
    def __init__(self, store: SpoolStore, deliver: Callable[[str], Awaitable[float | None]], concurrency: int,
                 clock: Callable[[], float] = time.time, on_flush: Callable[[], None] | None = None) -> None:
        self.store = store
        self.deliver = deliver
        self.clock = clock
        self.on_flush = on_flush  # e.g. forget unreachable hosts: a flush overrides that delay (SMTP-37)
        self._heap: list[tuple[float, str]] = []
        self._due: dict[str, float] = {}
        self._far = FarQueue()
        self._inflight: set[str] = set()
        self._pending_ctl: list[dict[str, str | None]] = []
        self.held: set[str] = set()  # parked by the operator (for the queue gauges)
        self._slots = asyncio.Semaphore(concurrency)
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        # Background resume (module rule): None when no scan runs.
        self._touched: set[str] | None = None
        self._found_recent: set[str] = set()
        self._recent_cutoff = 0.0
        self._forget_recent_at: float | None = None

    # -- placing entries -------------------------------------------------------------------------

    def _put(self, qid: str, due: float) -> None:
        if qid not in self._inflight and packable(qid) and (
                due > self.clock() + HORIZON or len(self._due) >= NEAR_CAP):
            self._due.pop(qid, None)  # its heap entry, if any, is now stale
            self._far.add(qid, due)
            return
        self._due[qid] = due
        heapq.heappush(self._heap, (due, qid))
        if self._heap[0][1] == qid:
            self._wake.set()

    def schedule(self, qid: str, due: float) -> None:
        """(Re)schedule `qid` at `due`; the latest call wins."""
        if self._touched is not None:
            self._touched.add(qid)
        self._put(qid, due)

    def add_new(self, qid: str, due: float) -> None:
        """A message just accepted (listener, DSN, report): schedule it unless the background
        scan already did (module rule)."""
        if qid in self._found_recent:
            self._found_recent.discard(qid)
            return
        self.schedule(qid, due)

    def forget(self, qid: str) -> None:
        if self._touched is not None:
            self._touched.add(qid)
        self._due.pop(qid, None)

    # -- background resume -----------------------------------------------------------------------

    def begin_scan(self) -> None:
        self._touched = set()
        self._found_recent = set()
        self._recent_cutoff = self.clock() - RECENT
        self._forget_recent_at = None

    def found(self, qid: str, due: float | None) -> bool:
        """A message the scan read from the spool: due None means held. False when a live path
        owns it already (module rule)."""
        if (self._touched is not None and qid in self._touched) or qid in self._due \
                or qid in self._inflight or qid in self.held:
            return False
        if id_created(qid) >= self._recent_cutoff:
            self._found_recent.add(qid)
        if due is None:
            self.held.add(qid)
        else:
            self._put(qid, due)
        return True

    def owns(self, qid: str) -> bool:
        """True when a live path has touched `qid` since the scan began (its files are in use)."""
        return (self._touched is not None and qid in self._touched) or qid in self._due or qid in self._inflight

    def end_scan(self) -> None:
        self._touched = None
        self._forget_recent_at = self.clock() + FORGET_RECENT_AFTER

    # -- reading ---------------------------------------------------------------------------------

    def request(self, op: str, qid: str | None) -> None:
        """An operator request from this process (the HTTP API): applied like a ctl/ file, at the
        next look at ctl/, but without writing one (it must work on a full disk too)."""
        if op not in control.OPS:
            raise ValueError(f"unknown operation {op}")
        self._pending_ctl.append({"op": op, "id": qid})

    def snapshot(self) -> tuple[dict[str, float], set[str], set[str]]:
        """(due time per scheduled id, ids in flight, held ids): copies (packed entries too: for
        tests and small queues; the gauges use queue_state)."""
        due = dict(self._far.items())
        due.update(self._due)
        return due, set(self._inflight), set(self.held)

    def queue_state(self, now: float, gauges: Callable[..., tuple[dict[str, int], float]]
                    ) -> tuple[dict[str, int], float]:
        """(messages per state, age of the oldest) as mta.metrics.queue_gauges (passed as `gauges`)
        computes them, with the packed entries counted in without unpacking them."""
        states, age = gauges(dict(self._due), set(self._inflight), set(self.held), now, id_created)
        started, later = self._far.counts(now)
        states["active"] = states.get("active", 0) + started
        states["deferred"] = states.get("deferred", 0) + later
        oldest = self._far.oldest()
        if oldest is not None:
            age = max(age, now - id_created(oldest))
        return states, age

    @property
    def queued(self) -> int:
        return len(self._due) + len(self._far)

    # -- handing out -----------------------------------------------------------------------------

    def _refill(self, now: float) -> None:
        """Bring packed entries that fall due within HORIZON back into the heap (up to NEAR_CAP)."""
        nxt = self._far.next_time()
        if self._forget_recent_at is not None and now >= self._forget_recent_at:
            self._found_recent = set()
            self._forget_recent_at = None
        if nxt is None or nxt > now + HORIZON or len(self._due) >= NEAR_CAP:
            return
        for due, qid in self._far.take(now + HORIZON, NEAR_CAP - len(self._due)):
            if qid in self._due or qid in self._inflight:
                continue  # rescheduled since it was packed: the later call wins
            self._due[qid] = due
            heapq.heappush(self._heap, (due, qid))

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
        # A schedule() of this id while it ran (a second notification, a DSN, the API) left an
        # entry in _due whose heap entry _pop_due dropped: push it again (the earlier time wins),
        # or the message would sit in the spool unscheduled until the next restart (issue 18).
        asked = self._due.pop(qid, None)
        if nxt is None:
            return  # done (or held): nothing left to schedule, not even what was asked meanwhile
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
            whole = not qid
            if qid:
                ids = [qid]
            elif op == "flush":
                parked = self._far.clear()  # every one is re-placed below
                # While the scan runs, the spool's list also holds what it has not reached yet.
                ids = self.store.ids() if self._touched is not None else [*self._due, *parked]
            else:
                ids = self.store.ids()  # while the scan runs, also what it has not reached yet
            for one in ids:
                if one in self._inflight:
                    self._pending_ctl.append({"op": op, "id": one})
                    continue
                try:
                    meta = self.store.load_sync(one)
                    new = control.apply_to_meta(meta, op, now)
                    if new is None:
                        self.store._discard(one)
                    else:
                        self.store._update_sync(new)
                except Exception as exc:
                    # A full or broken disk must not stop the scheduler; the operator sees why.
                    if not isinstance(exc, SpoolError) or self.store.exists(one):
                        _log.error("queue %s %s failed: %s", op, one, exc)
                        if whole and one not in self._due and one not in self.held:
                            self._put(one, now + 60)  # taken out of the FarQueue above: keep it
                    continue
                if not whole:
                    self._far.discard(one)  # its packed entry, if any, is superseded now
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
        if qid in self._found_recent:  # the background scan scheduled it already
            self._found_recent.discard(qid)
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
            self._refill(now)
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
