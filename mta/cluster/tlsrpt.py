"""TLS-RPT counters and report claims of a cluster, on PostgreSQL (issue 15, CLU-3, CLU-6).

Rule: counting is `ResultStore.record()` unchanged (memory, no I/O). `flush()` adds the counts to
the shared tables with UPSERTs that add, so the stored rows are the sums over every node.
Each flush is a batch with a unique id (node, boot, sequence), inserted into
`mta_tlsrpt_batches` in the same transaction as its counts: if the connection breaks around
COMMIT the batch is kept and retried under the same id, and a retry of a batch that did commit
changes nothing. So a database restart loses no counts and counts none twice (CLU-6). While the
database is down the counts stay in memory (new sessions keep adding to them) and go out when it
returns; only a node stopped during an outage loses its unsent counts, and says how many.

HTTPS retries (RPT-21) live in `mta_tlsrpt_post_retries`; `due_retries` takes the due rows by
moving their next try CLAIM_LEASE ahead in the same statement, so one node retries each, and a
node that dies meanwhile leaves them due again after the lease.

Claims (CLU-3): one row per (day, policy domain) in `mta_tlsrpt_sent`, taken with an
INSERT .. ON CONFLICT that only succeeds when no claim exists or the existing one is still
`claimed` and its lease (database clock) has run out. So exactly one node sends each report,
built from the summed counts; a node that dies between claiming and finishing loses the claim
after CLAIM_LEASE, and the next run sends it: at most one duplicate, only in that window.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import itertools
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

import psycopg

from mta.cluster.db import ClusterDb, ClusterError, redact
from mta.tlsrpt.report import PolicySummary
from mta.tlsrpt.retry import PendingPost
from mta.tlsrpt.store import FailureKey, ResultStore, SentRow, SessionKey, _host, build_summaries

_log = logging.getLogger("mta.tlsrpt")

CLAIM_LEASE = 900.0  # seconds; longer than a report run (https tries with backoff, a few mails)

_UPSERT_SESSION = (
    "INSERT INTO mta_tlsrpt_sessions AS t (day, domain, policy_type, policy_text, successful, failed) "
    "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (day, domain, policy_type, policy_text) DO UPDATE SET "
    "successful = t.successful + excluded.successful, failed = t.failed + excluded.failed"
)
_UPSERT_FAILURE = (
    "INSERT INTO mta_tlsrpt_failures AS t (day, domain, policy_type, policy_text, result_type, sending_ip, "
    "mx_host, receiving_ip, reason_code, count) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
    "ON CONFLICT (day, domain, policy_type, policy_text, result_type, sending_ip, mx_host, receiving_ip, "
    "reason_code) DO UPDATE SET count = t.count + excluded.count"
)
_CLAIM = (
    "INSERT INTO mta_tlsrpt_sent AS s (day, domain, report_id, claimed_at, status, node, lease_until) "
    "VALUES (%s, %s, %s, %s, 'claimed', %s, now() + make_interval(secs => %s)) "
    "ON CONFLICT (day, domain) DO UPDATE SET report_id = excluded.report_id, claimed_at = excluded.claimed_at, "
    "status = 'claimed', detail = '', node = excluded.node, lease_until = excluded.lease_until "
    "WHERE s.status = 'claimed' AND s.lease_until < now() "
    "RETURNING report_id"
)

Batch = tuple[str, dict[SessionKey, list[int]], dict[FailureKey, int]]


class PgResultStore(ResultStore):
    """ResultStore whose counts and claims live in the cluster database (see the module rule)."""

    def __init__(self, db: ClusterDb, *, sending_ip: str | None = None, record_all_sessions: bool = False,
                 flush_interval: float = 1.0, lease: float = CLAIM_LEASE,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(redact(db.url), sending_ip=sending_ip, record_all_sessions=record_all_sessions,
                         flush_interval=flush_interval, clock=clock)
        self.db = db
        self.lease = lease
        self._boot = secrets.token_hex(4)  # batch ids stay unique across restarts of this node
        self._seq = itertools.count(1)
        self._unconfirmed: list[Batch] = []  # sent, outcome unknown: retried under the same id
        self._pg_flush_lock = asyncio.Lock()

    def pending(self) -> int:
        unconfirmed = sum(ok + bad for _, sessions, _ in self._unconfirmed for ok, bad in sessions.values())
        return super().pending() + unconfirmed

    async def flush(self) -> None:
        """Add the counts to the database; raises ClusterError (kept for the next flush) when it is down."""
        async with self._pg_flush_lock:
            while self._unconfirmed:
                await self.db.run(lambda conn: self._apply(conn, self._unconfirmed[0]))
                self._unconfirmed.pop(0)
            if not self._sessions and not self._failures:
                return
            batch: Batch = (f"{self.db.node}.{self._boot}.{next(self._seq)}", self._sessions, self._failures)
            self._sessions, self._failures = {}, {}
            self._unconfirmed.append(batch)
            await self.db.run(lambda conn: self._apply(conn, batch))
            self._unconfirmed.remove(batch)

    async def flush_loop(self, stop_event: asyncio.Event) -> None:
        while not stop_event.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop_event.wait(), timeout=self.flush_interval)
            with contextlib.suppress(ClusterError):  # the outage is logged once by ClusterDb
                await self.flush()

    async def close(self) -> None:
        try:
            await self.flush()
        except ClusterError as exc:
            _log.error("tlsrpt: %d session count(s) not stored, the cluster database is unreachable at exit: %s",
                       self.pending(), exc)

    def close_sync(self) -> None:
        """Nothing to close here: the database belongs to the ClusterDb owner."""

    @staticmethod
    async def _apply(conn: psycopg.AsyncConnection[Any], batch: Batch) -> None:
        batch_id, sessions, failures = batch
        days = sorted({k[0] for k in sessions})
        async with conn.transaction():
            cur = await conn.execute("INSERT INTO mta_tlsrpt_batches (batch_id, day) VALUES (%s, %s) "
                                     "ON CONFLICT (batch_id) DO NOTHING", (batch_id, days[0] if days else ""))
            if cur.rowcount != 1:
                return  # committed before the connection broke: never count it twice
            async with conn.cursor() as c:
                if sessions:
                    await c.executemany(_UPSERT_SESSION, [(*k, ok, bad) for k, (ok, bad) in sessions.items()])
                if failures:
                    await c.executemany(_UPSERT_FAILURE, [(*k, n) for k, n in failures.items()])

    # -- reading and claims ------------------------------------------------------------------

    async def _rows(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        async def go(conn: psycopg.AsyncConnection[Any]) -> list[tuple[Any, ...]]:
            return list(await (await conn.execute(sql, args)).fetchall())  # type: ignore[arg-type]

        return await self.db.run(go)

    async def days(self) -> list[datetime.date]:
        return [datetime.date.fromisoformat(str(d)) for (d,) in
                await self._rows("SELECT DISTINCT day FROM mta_tlsrpt_sessions ORDER BY day")]

    async def summaries(self, day: datetime.date) -> dict[str, list[PolicySummary]]:
        iso = day.isoformat()
        failures = await self._rows(
            "SELECT domain, policy_type, policy_text, result_type, sending_ip, mx_host, receiving_ip, reason_code, "
            "count FROM mta_tlsrpt_failures WHERE day = %s", (iso,))
        sessions = await self._rows("SELECT domain, policy_type, policy_text, successful, failed "
                                    "FROM mta_tlsrpt_sessions WHERE day = %s", (iso,))
        return build_summaries(failures, sessions)

    async def prune(self, before: datetime.date) -> None:
        iso = before.isoformat()

        async def go(conn: psycopg.AsyncConnection[Any]) -> None:
            async with conn.transaction():
                for table in ("mta_tlsrpt_sessions", "mta_tlsrpt_failures", "mta_tlsrpt_sent", "mta_tlsrpt_batches",
                              "mta_tlsrpt_post_retries"):
                    await conn.execute(f"DELETE FROM {table} WHERE day < %s", (iso,))  # type: ignore[arg-type]

        await self.db.run(go)

    async def claim(self, day: datetime.date, domain: str, report_id: str) -> bool:
        rows = await self._rows(_CLAIM, (day.isoformat(), _host(domain), report_id, self._clock(), self.db.node,
                                         self.lease))
        return bool(rows)

    async def finish(self, day: datetime.date, domain: str, status: str, detail: str = "",
                     report_id: str | None = None) -> None:
        # Only our own claim: after a lease ran out another node's claim must not be overwritten.
        await self._rows("UPDATE mta_tlsrpt_sent SET status = %s, detail = %s WHERE day = %s AND domain = %s "
                         "AND (%s::text IS NULL OR report_id = %s) RETURNING day",
                         (status, detail, day.isoformat(), _host(domain), report_id, report_id))

    async def sent(self, day: datetime.date) -> dict[str, SentRow]:
        """Claimed rows of `day`; a claim whose lease ran out is left out, so it is sent again."""
        rows = await self._rows(
            "SELECT domain, report_id, claimed_at, status, detail FROM mta_tlsrpt_sent WHERE day = %s "
            "AND NOT (status = 'claimed' AND lease_until < now())", (day.isoformat(),))
        return {str(d): SentRow(day, str(d), str(rid), float(at), str(st), str(det)) for d, rid, at, st, det in rows}

    # -- https retries (RPT-21), shared ------------------------------------------------------

    async def add_retries(self, posts: list[PendingPost]) -> None:
        async def go(conn: psycopg.AsyncConnection[Any]) -> None:
            async with conn.cursor() as c:
                await c.executemany(
                    "INSERT INTO mta_tlsrpt_post_retries (day, domain, url, report_id, body, first_failed, tries, "
                    "next_try, last_error) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) "
                    "ON CONFLICT (day, domain, url) DO UPDATE SET report_id = excluded.report_id, "
                    "body = excluded.body, first_failed = excluded.first_failed, tries = excluded.tries, "
                    "next_try = excluded.next_try, last_error = excluded.last_error",
                    [(p.day.isoformat(), _host(p.domain), p.url, p.report_id, p.body, p.first_failed, p.tries,
                      p.next_try, p.last_error) for p in posts])

        await self.db.run(go)

    async def due_retries(self, now: float) -> list[PendingPost]:
        rows = await self._rows(
            "UPDATE mta_tlsrpt_post_retries SET next_try = %s WHERE next_try <= %s RETURNING day, domain, url, "
            "report_id, body, first_failed, tries, next_try, last_error", (now + self.lease, now))
        return sorted((PendingPost(datetime.date.fromisoformat(d), str(dom), str(u), str(rid), bytes(b), float(ff),
                                   int(t), float(nt), str(err)) for d, dom, u, rid, b, ff, t, nt, err in rows),
                      key=lambda p: (p.day, p.domain, p.url))

    async def drop_retry(self, day: datetime.date, domain: str, url: str | None = None) -> int:
        args: tuple[object, ...] = (day.isoformat(), _host(domain))

        async def go(conn: psycopg.AsyncConnection[Any]) -> int:
            async with conn.transaction():
                if url is None:
                    await conn.execute("DELETE FROM mta_tlsrpt_post_retries WHERE day = %s AND domain = %s", args)
                else:
                    await conn.execute("DELETE FROM mta_tlsrpt_post_retries WHERE day = %s AND domain = %s "
                                       "AND url = %s", (*args, url))
                cur = await conn.execute("SELECT count(*) FROM mta_tlsrpt_post_retries WHERE day = %s "
                                         "AND domain = %s", args)
                row = await cur.fetchone()
            return int(row[0]) if row else 0

        return await self.db.run(go)
