"""Durable TLS-RPT session counters (RFC 8460 §4.2, STS-93) and the record of reports sent.

Rule: `record()` is the hot path and does no I/O: it bumps in-memory counters keyed by
(UTC day, policy domain, applied policy) and, for a failure, by the failure-details members
(result-type, sending-mta-ip, receiving-mx-hostname, receiving-ip, failure-reason-code).
`flush()` swaps the counters out and merges them into SQLite in a worker thread as additions
(`count = count + excluded.count`), so any number of processes and `ResultStore` instances may
write the same file (WAL mode, busy_timeout, one BEGIN IMMEDIATE transaction per flush) and the
totals are the sums. A failed flush puts its counters back for the next one; a crash loses at
most the last `flush_interval` seconds of counts (reports are best-effort, RPT-21).

What is counted (the caller reports every session, the rules are here):
- a session under an MTA-STS policy in `testing` or `enforce` mode: policy-type "sts" with the
  policy text (Policy.lines()) kept on the row, so the report can show policy-string/mx-host;
- a policy in mode `none`: nothing (STS-65, STS-91 "unless mode none");
- a session to a host with DANE (a secure TLSA RRset, or a TLSA lookup that failed in a signed
  zone): policy-type "tlsa" with the records as "usage selector mtype HEX" lines (RFC 8460 §4.4),
  one entry per distinct RRset; with an MTA-STS policy too, the caller records under each;
- a discovery failure with no policy at all (e.g. fetch error, nothing cached): "sts" with an empty
  policy-string, because a TXT record announced a policy (STS-91);
- any other session only with `record_all_sessions`, as "no-policy-found";
- sessions run inside `not_recorded()` (the delivery of report mails themselves, RPT-19/RPT-23):
  nothing.

The `sent` table holds one row per (day, policy domain), inserted BEFORE a report goes out: a
report is sent at most once, even across restarts and between `mta serve` and `mta tlsrpt send`.
The `post_retries` table holds reports whose https targets all failed, per target, with the gzip
body and when to try again (RPT-21, mta.tlsrpt.retry); the `sent` row says `retrying` meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import datetime
import ipaddress
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mta.db import open_wal
from mta.errors import DnsError
from mta.net.dns import to_ascii
from mta.sts.policy import Policy
from mta.tlsrpt.report import RESULT_TYPES, FailureDetail, PolicySummary
from mta.tlsrpt.retry import PendingPost

_log = logging.getLogger("mta.tlsrpt")

STS, TLSA, NO_POLICY = "sts", "tlsa", "no-policy-found"
MAX_REASON = 256  # failure-reason-code is free text; cap it so one odd reply cannot bloat a report
SCHEMA_VERSION = 1

_RECORDING: contextvars.ContextVar[bool] = contextvars.ContextVar("mta_tlsrpt_recording", default=True)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    day TEXT NOT NULL, domain TEXT NOT NULL, policy_type TEXT NOT NULL, policy_text TEXT NOT NULL,
    successful INTEGER NOT NULL DEFAULT 0, failed INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (day, domain, policy_type, policy_text));
CREATE TABLE IF NOT EXISTS failures (
    day TEXT NOT NULL, domain TEXT NOT NULL, policy_type TEXT NOT NULL, policy_text TEXT NOT NULL,
    result_type TEXT NOT NULL, sending_ip TEXT NOT NULL, mx_host TEXT NOT NULL, receiving_ip TEXT NOT NULL,
    reason_code TEXT NOT NULL, count INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (day, domain, policy_type, policy_text, result_type, sending_ip, mx_host, receiving_ip,
                 reason_code));
CREATE TABLE IF NOT EXISTS sent (
    day TEXT NOT NULL, domain TEXT NOT NULL, report_id TEXT NOT NULL, claimed_at REAL NOT NULL,
    status TEXT NOT NULL, detail TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (day, domain));
CREATE TABLE IF NOT EXISTS post_retries (
    day TEXT NOT NULL, domain TEXT NOT NULL, url TEXT NOT NULL, report_id TEXT NOT NULL, body BLOB NOT NULL,
    first_failed REAL NOT NULL, tries INTEGER NOT NULL, next_try REAL NOT NULL, last_error TEXT NOT NULL,
    PRIMARY KEY (day, domain, url));
"""
# Key columns are NOT NULL ('' for "absent"): SQLite treats NULLs in a UNIQUE key as distinct,
# which would turn every UPSERT on such a row into a new row.
_UPSERT_SESSION = (
    "INSERT INTO sessions (day, domain, policy_type, policy_text, successful, failed) VALUES (?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (day, domain, policy_type, policy_text) DO UPDATE SET "
    "successful = successful + excluded.successful, failed = failed + excluded.failed"
)
_UPSERT_FAILURE = (
    "INSERT INTO failures (day, domain, policy_type, policy_text, result_type, sending_ip, mx_host, receiving_ip, "
    "reason_code, count) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (day, domain, policy_type, policy_text, result_type, sending_ip, mx_host, receiving_ip, "
    "reason_code) DO UPDATE SET count = count + excluded.count"
)

SessionKey = tuple[str, str, str, str]  # day, domain, policy_type, policy_text
FailureKey = tuple[str, str, str, str, str, str, str, str, str]  # + result_type, sending/mx/receiving, reason


@contextlib.contextmanager
def not_recorded() -> Iterator[None]:
    """Sessions run inside this block, and in tasks started inside it, are not counted.

    For the delivery of report mails (RPT-23: their own failures never produce reports; RPT-19:
    such a session "SHOULD NOT" be counted). Enter and leave it in the same task.
    """
    token = _RECORDING.set(False)
    try:
        yield
    finally:
        _RECORDING.reset(token)


def utc_day(ts: float) -> datetime.date:
    """The UTC day of a Unix time (reports cover UTC days, RPT-11)."""
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).date()


def _ip_or_empty(value: str | None) -> str:
    if not value:
        return ""
    try:
        return str(ipaddress.ip_address(value.strip().strip("[]")))  # RFC 5952 text for IPv6
    except ValueError:
        return ""


def _host(value: str | None) -> str:
    return (value or "").strip().rstrip(".").lower()


@dataclass(frozen=True)
class SentRow:
    """One claimed (day, domain): which report, when, and how its delivery went."""

    day: datetime.date
    domain: str
    report_id: str
    claimed_at: float
    status: str  # claimed | sent | retrying | failed
    detail: str


def build_summaries(failure_rows: Iterable[Sequence[object]],
                    session_rows: Iterable[Sequence[object]]) -> dict[str, list[PolicySummary]]:
    """PolicySummary lists per domain from stored rows, in a stable order (any store's rows).

    failure_rows: (domain, policy_type, policy_text, result_type, sending_ip, mx_host, receiving_ip,
    reason_code, count); session_rows: (domain, policy_type, policy_text, successful, failed).
    """
    out: dict[str, list[PolicySummary]] = {}
    details: dict[tuple[str, str, str], list[FailureDetail]] = {}
    for domain, ptype, text, rtype, sip, mx, rip, code, count in sorted(
            ((*(str(v) for v in r[:8]), int(r[8])) for r in failure_rows),  # type: ignore[call-overload]
            key=lambda r: (r[0], r[1], r[2], r[3], r[5], r[6], r[4], r[7])):
        details.setdefault((domain, ptype, text), []).append(FailureDetail(
            result_type=rtype, sending_mta_ip=sip or None, receiving_mx_hostname=mx or None,
            receiving_ip=rip or None, failed_session_count=count, failure_reason_code=code or None))
    for domain, ptype, text, ok, bad in sorted(
            (str(r[0]), str(r[1]), str(r[2]), int(r[3]), int(r[4])) for r in session_rows):  # type: ignore[call-overload]
        lines = tuple(text.split("\n")) if text else ()
        out.setdefault(domain, []).append(PolicySummary(
            policy_type=ptype, policy_string=lines, policy_domain=domain,
            mx_host=tuple(line[4:] for line in lines if line.startswith("mx: ")),
            successful=ok, failed=bad, failures=tuple(details.get((domain, ptype, text), ()))))
    return out


class ResultStore:
    """Counts delivery sessions for TLS reports and keeps them in SQLite (see the module rule)."""

    def __init__(self, path: str | Path, *, sending_ip: str | None = None, record_all_sessions: bool = False,
                 flush_interval: float = 1.0, busy_timeout: float = 10.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.sending_ip = _ip_or_empty(sending_ip)
        self.record_all_sessions = record_all_sessions
        self.flush_interval = flush_interval
        self.busy_timeout = busy_timeout
        self._clock = clock
        self._sessions: dict[SessionKey, list[int]] = {}  # [successful, failed]
        self._failures: dict[FailureKey, int] = {}
        self._conn: sqlite3.Connection | None = None
        self._db_lock = threading.Lock()  # one connection, used from worker threads one at a time
        self._flush_lock: asyncio.Lock | None = None
        self._writes: set[asyncio.Future[None]] = set()

    # -- hot path ------------------------------------------------------------------------------

    def record(self, *, policy_domain: str, policy: Policy | None, success: bool, result_type: str | None,
               mx_host: str | None, receiving_ip: str | None, reason: str = "",
               sending_ip: str | None = None, tlsa: Sequence[str] | None = None) -> None:
        """Count one session (failed when its policy discovery failed, STS-91); in-memory only, no I/O.

        `tlsa` (the RRset as presentation lines) records the session under DANE instead of `policy`.
        """
        if not _RECORDING.get():
            return  # RPT-23: a report mail's own delivery
        if tlsa is not None:
            policy_type, text = TLSA, "\n".join(tlsa)
        elif policy is not None:
            if policy.mode == "none":
                return  # STS-65: mode none means "no policy" for reporting too
            policy_type, text = STS, "\n".join(policy.lines())
        elif result_type is not None and result_type.startswith("sts-"):
            policy_type, text = STS, ""  # STS-91: a TXT record announced a policy we could not get
        elif self.record_all_sessions:
            policy_type, text = NO_POLICY, ""
        else:
            return
        domain = _host(policy_domain)
        if not domain.isascii():  # rare: keep one spelling (A-labels) per domain, RPT-9
            try:
                domain = to_ascii(domain)
            except DnsError:
                return
        if not domain:
            return
        key: SessionKey = (utc_day(self._clock()).isoformat(), domain, policy_type, text)
        counts = self._sessions.get(key)
        if counts is None:
            counts = self._sessions[key] = [0, 0]
        if success:
            counts[0] += 1
            return
        counts[1] += 1
        kind = result_type if result_type in RESULT_TYPES else "validation-failure"
        # An unregistered type would make the whole report invalid (RPT-15): keep it as the reason.
        code = reason if kind == result_type else (result_type or reason or "unknown")
        fkey: FailureKey = (*key, kind, _ip_or_empty(sending_ip) or self.sending_ip, _host(mx_host),
                            _ip_or_empty(receiving_ip), " ".join(code.split())[:MAX_REASON])
        self._failures[fkey] = self._failures.get(fkey, 0) + 1

    def pending(self) -> int:
        """Sessions counted in memory and not yet flushed."""
        return sum(s + f for s, f in self._sessions.values())

    # -- flushing ------------------------------------------------------------------------------

    async def flush(self) -> None:
        """Merge the in-memory counters into the database (in a thread); put them back on failure."""
        if self._flush_lock is None:
            self._flush_lock = asyncio.Lock()
        async with self._flush_lock:
            sessions, failures = self._sessions, self._failures
            if not sessions and not failures:
                return
            self._sessions, self._failures = {}, {}
            write = asyncio.ensure_future(asyncio.to_thread(self._write_sync, sessions, failures))
            self._writes.add(write)

            def done(fut: asyncio.Future[None]) -> None:
                self._writes.discard(fut)
                # The transaction rolled back: count again next time. (A cancelled future may
                # still have committed in its thread, so it is not merged back: never counted twice.)
                if not fut.cancelled() and fut.exception() is not None:
                    self._merge(sessions, failures)

            write.add_done_callback(done)
            # Shielded: a cancelled flush_loop must not abandon a half-known write.
            await asyncio.shield(write)

    def _merge(self, sessions: dict[SessionKey, list[int]], failures: dict[FailureKey, int]) -> None:
        for key, (ok, bad) in sessions.items():
            counts = self._sessions.setdefault(key, [0, 0])
            counts[0] += ok
            counts[1] += bad
        for fkey, n in failures.items():
            self._failures[fkey] = self._failures.get(fkey, 0) + n

    async def flush_loop(self, stop_event: asyncio.Event) -> None:
        """Flush every `flush_interval` seconds until `stop_event` is set (close() does the last one)."""
        while not stop_event.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop_event.wait(), timeout=self.flush_interval)
            try:
                await self.flush()
            except (sqlite3.Error, OSError) as exc:
                _log.warning("tlsrpt: cannot store session counts in %s (will retry): %s", self.path, exc)

    async def close(self) -> None:
        """Final flush, then close the database."""
        try:
            await self.flush()
        except (sqlite3.Error, OSError) as exc:
            _log.error("tlsrpt: %d session count(s) lost, cannot write %s: %s", self.pending(), self.path, exc)
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
        await asyncio.to_thread(self.close_sync)

    def close_sync(self) -> None:
        with self._db_lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # -- database ------------------------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        """The connection (caller holds _db_lock); opened, migrated and switched to WAL on first use."""
        if self._conn is None:
            # WAL: readers (the CLI) never block the server's writers and vice versa.
            self._conn = open_wal(self.path, schema=_SCHEMA + f"\nPRAGMA user_version = {SCHEMA_VERSION};",
                                  timeout=self.busy_timeout)
        return self._conn

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT: the write lock is taken up front, so busy_timeout applies."""
        with self._db_lock:
            conn = self._db()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _write_sync(self, sessions: dict[SessionKey, list[int]], failures: dict[FailureKey, int]) -> None:
        with self._transaction() as conn:
            conn.executemany(_UPSERT_SESSION, [(*k, ok, bad) for k, (ok, bad) in sessions.items()])
            conn.executemany(_UPSERT_FAILURE, [(*k, n) for k, n in failures.items()])

    def _query(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        with self._db_lock:
            return list(self._db().execute(sql, args).fetchall())

    # -- reading -------------------------------------------------------------------------------

    def days_sync(self) -> list[datetime.date]:
        """Every day that has stored counts, oldest first."""
        return [datetime.date.fromisoformat(str(d)) for (d,) in
                self._query("SELECT DISTINCT day FROM sessions ORDER BY day")]

    def summaries_sync(self, day: datetime.date) -> dict[str, list[PolicySummary]]:
        """Stored counts of `day` per policy domain: one PolicySummary per applied policy (RPT-10)."""
        iso = day.isoformat()
        return build_summaries(
            self._query("SELECT domain, policy_type, policy_text, result_type, sending_ip, mx_host, receiving_ip, "
                        "reason_code, count FROM failures WHERE day = ?", (iso,)),
            self._query("SELECT domain, policy_type, policy_text, successful, failed FROM sessions WHERE day = ?",
                        (iso,)))

    def prune_sync(self, before: datetime.date) -> None:
        """Forget counts and sent rows of days before `before` (they can no longer be reported)."""
        iso = before.isoformat()
        with self._transaction() as conn:
            for table in ("sessions", "failures", "sent", "post_retries"):
                conn.execute(f"DELETE FROM {table} WHERE day < ?", (iso,))  # table names are constants

    # -- the async API the sender uses (the cluster store overrides these, issue 15) ------------

    async def days(self) -> list[datetime.date]:
        return await asyncio.to_thread(self.days_sync)

    async def summaries(self, day: datetime.date) -> dict[str, list[PolicySummary]]:
        return await asyncio.to_thread(self.summaries_sync, day)

    async def prune(self, before: datetime.date) -> None:
        await asyncio.to_thread(self.prune_sync, before)

    async def claim(self, day: datetime.date, domain: str, report_id: str) -> bool:
        return await asyncio.to_thread(self.claim_sync, day, domain, report_id)

    async def finish(self, day: datetime.date, domain: str, status: str, detail: str = "",
                     report_id: str | None = None) -> None:
        await asyncio.to_thread(self.finish_sync, day, domain, status, detail)

    async def sent(self, day: datetime.date) -> dict[str, SentRow]:
        return await asyncio.to_thread(self.sent_sync, day)

    async def add_retries(self, posts: list[PendingPost]) -> None:
        await asyncio.to_thread(self.add_retries_sync, posts)

    async def due_retries(self, now: float) -> list[PendingPost]:
        return await asyncio.to_thread(self.due_retries_sync, now)

    async def drop_retry(self, day: datetime.date, domain: str, url: str | None = None) -> int:
        return await asyncio.to_thread(self.drop_retry_sync, day, domain, url)

    # -- the sent table ------------------------------------------------------------------------

    def claim_sync(self, day: datetime.date, domain: str, report_id: str) -> bool:
        """Reserve (day, domain) for one report; False when it was already claimed (never send twice).

        Claimed BEFORE anything goes out, so a crash in between loses the report rather than
        sending it twice (at most once).
        """
        with self._transaction() as conn:
            cur = conn.execute(
                "INSERT INTO sent (day, domain, report_id, claimed_at, status) VALUES (?, ?, ?, ?, 'claimed') "
                "ON CONFLICT (day, domain) DO NOTHING",
                (day.isoformat(), _host(domain), report_id, self._clock()))
            return cur.rowcount == 1

    def finish_sync(self, day: datetime.date, domain: str, status: str, detail: str = "") -> None:
        """Note how a claimed report's delivery went (sent, failed)."""
        with self._transaction() as conn:
            conn.execute("UPDATE sent SET status = ?, detail = ? WHERE day = ? AND domain = ?",
                         (status, detail, day.isoformat(), _host(domain)))

    def sent_sync(self, day: datetime.date) -> dict[str, SentRow]:
        """The claimed (day, domain) rows of `day`, by domain."""
        rows = self._query("SELECT domain, report_id, claimed_at, status, detail FROM sent WHERE day = ?",
                           (day.isoformat(),))
        return {str(d): SentRow(day, str(d), str(rid), float(at), str(st), str(det))  # type: ignore[arg-type]
                for d, rid, at, st, det in rows}

    # -- the post_retries table (RPT-21) -------------------------------------------------------

    def add_retries_sync(self, posts: list[PendingPost]) -> None:
        with self._transaction() as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO post_retries (day, domain, url, report_id, body, first_failed, tries, "
                "next_try, last_error) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(p.day.isoformat(), _host(p.domain), p.url, p.report_id, p.body, p.first_failed, p.tries,
                  p.next_try, p.last_error) for p in posts])

    def due_retries_sync(self, now: float) -> list[PendingPost]:
        rows = self._query("SELECT day, domain, url, report_id, body, first_failed, tries, next_try, last_error "
                           "FROM post_retries WHERE next_try <= ? ORDER BY next_try", (now,))
        return [_pending(row) for row in rows]

    def drop_retry_sync(self, day: datetime.date, domain: str, url: str | None = None) -> int:
        """Forget one target's retries (or the whole report's); returns how many remain for the report."""
        args: tuple[object, ...] = (day.isoformat(), _host(domain))
        with self._transaction() as conn:
            if url is None:
                conn.execute("DELETE FROM post_retries WHERE day = ? AND domain = ?", args)
            else:
                conn.execute("DELETE FROM post_retries WHERE day = ? AND domain = ? AND url = ?", (*args, url))
            (left,) = conn.execute("SELECT COUNT(*) FROM post_retries WHERE day = ? AND domain = ?", args).fetchone()
        return int(left)


def _pending(row: tuple[Any, ...]) -> PendingPost:
    day, domain, url, report_id, body, first, tries, nxt, err = row
    return PendingPost(datetime.date.fromisoformat(day), domain, url, report_id, bytes(body), float(first),
                       int(tries), float(nxt), err)
