"""Persistent MTA-STS policy cache (STS-55..66): SQLite on disk, a dict in memory.

Rule: the cache stores what `sts.decide` produced and nothing else decides here. It survives
restarts (STS-64): entries keep their original `fetched_at`/`expires_at` (wall clock), so expiry
counts from the fetch, not from the restart. An entry is only ever replaced by `put`; nothing in
this module deletes one because a lookup failed (STS-56/57).

Reads are served from memory after one load of the table (a single thread hop), so a warm
lookup costs a dict access. Writes update memory at once, then go to SQLite (WAL mode) in a
worker thread; the thread writes the *current* in-memory row, so writes that overtake each other
still leave the newest state on disk. `touch` (last use, for proactive refresh of domains we
actually send to, STS-61) is kept in memory and written at most once a minute per domain.

Writes are compare-and-set (issue 10 item 2): `put(entry, expected=...)` replaces the current
entry only if it is still the one the writer decided from, or if the new entry comes from a later
fetch; otherwise it is dropped. So a writer holding an old snapshot (a background refresh that
waited on its gate) can never roll back a newer policy. SQLite gets the same guard: a row is only
overwritten by a row from a later (or the same) fetch, or when it is the row this process last
read or wrote, so another process's newer row survives too.

Damage fails closed (issue 10 item 3): a database that cannot be read keeps the in-memory
entries applying (a fetched policy is kept in memory even when nothing could be loaded) and the
load is retried on every lookup; a row that no longer parses (edited by hand, written by a newer
version) is remembered as damaged (`damage()`, `damaged()`), so the service logs an error on every
discovery of that domain and `mta policy --cache` shows it; the next successful fetch replaces it.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from mta.db import open_wal
from mta.errors import MtaError, StsPolicyError
from mta.sts.decide import CacheEntry
from mta.sts.policy import parse_policy, policy_to_text

log = logging.getLogger(__name__)

T = TypeVar("T")

ANY = object()  # `put` without `expected`: only the fetch-time order counts
TOUCH_WRITE_INTERVAL = 60.0  # seconds between disk writes of last_used_at for one domain

_SCHEMA = """
CREATE TABLE IF NOT EXISTS policies (
    domain       TEXT PRIMARY KEY,
    txt_id       TEXT NOT NULL,
    policy_text  TEXT NOT NULL,
    dialect      TEXT NOT NULL DEFAULT 'rfc8461',
    fetched_at   REAL NOT NULL,
    expires_at   REAL NOT NULL,
    failed_id    TEXT,
    failed_at    REAL,
    last_used_at REAL
)
"""
_COLUMNS = "domain, txt_id, policy_text, dialect, fetched_at, expires_at, failed_id, failed_at, last_used_at"


class CacheError(MtaError):
    """The policy cache file could not be opened, read or written."""


class PolicyStore(Protocol):
    """What the MTA-STS service needs of a policy cache: this SQLite one, or the cluster's on
    PostgreSQL (mta.cluster.policies, issue 15). `mta.app` picks one from `[cluster] database`."""

    async def get(self, domain: str) -> CacheEntry | None: ...
    def peek(self, domain: str) -> CacheEntry | None: ...
    def damage(self, domain: str) -> str | None: ...
    def damaged(self) -> dict[str, str]: ...
    async def put(self, entry: CacheEntry, expected: CacheEntry | object | None = ANY) -> bool: ...
    async def all(self) -> list[CacheEntry]: ...
    async def touch(self, domain: str, now: float) -> None: ...
    def last_used(self, domain: str) -> float | None: ...
    async def close(self) -> None: ...


class InMemoryPolicies:
    """What both policy caches keep in memory and answer from it: this SQLite one and the cluster's
    (mta.cluster.policies). Entries by domain, damaged rows, last-use times; subclasses add the I/O
    (when to load, where a stored or touched entry is written)."""

    def __init__(self) -> None:
        self._entries: dict[str, CacheEntry] = {}
        self._damaged: dict[str, str] = {}  # domain -> why its stored row could not be read (item 3)
        self._last_used: dict[str, float] = {}
        self._last_used_written: dict[str, float] = {}

    def peek(self, domain: str) -> CacheEntry | None:
        """The in-memory entry for `domain`, without touching the database (never raises)."""
        return self._entries.get(domain.lower())

    def damaged(self) -> dict[str, str]:
        """Every damaged row seen by the last read: domain -> why it could not be read."""
        return dict(self._damaged)

    def _row_damage(self, domain: str) -> str | None:
        domain = domain.lower()
        if domain in self._damaged:
            return f"stored policy of {domain} is unreadable: {self._damaged[domain]}"
        return None

    def _replace(self, entry: CacheEntry, expected: CacheEntry | object | None) -> str | None:
        """Keep `entry` in memory unless that would roll back a newer one (see `supersedes`);
        returns its domain when it was kept, for the subclass to write."""
        domain = entry.domain.lower()
        if not supersedes(entry, self._entries.get(domain), expected):
            return None
        self._entries[domain] = entry
        return domain

    def _note_use(self, domain: str, now: float) -> str | None:
        """Record a use of `domain` at `now`; returns the domain when its stored last-use time is due
        for a write (at most once per TOUCH_WRITE_INTERVAL, and only for a cached policy)."""
        domain = domain.lower()
        self._last_used[domain] = now
        if domain in self._entries and now - self._last_used_written.get(domain, float("-inf")) >= TOUCH_WRITE_INTERVAL:
            self._last_used_written[domain] = now
            return domain
        return None

    def _sorted(self) -> list[CacheEntry]:
        return [self._entries[d] for d in sorted(self._entries)]

    def size(self) -> int:
        """How many policies are held in memory (the mta_sts_policies_cached gauge)."""
        return len(self._entries)

    def last_used(self, domain: str) -> float | None:
        """When mail last went to `domain` (None if never, as far as this cache knows)."""
        return self._last_used.get(domain.lower())


class PolicyCache(InMemoryPolicies):
    """Policy cache at `path` (created if missing). Coroutine methods; call `close()` when done."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path)
        self._lock = threading.Lock()  # one sqlite3 connection, used by one worker thread at a time
        self._conn: sqlite3.Connection | None = None
        self._loaded = False
        self._load_lock = asyncio.Lock()
        self._closed = False
        self._load_error: str | None = None  # why the table could not be read at all, until it can
        self._on_disk: dict[str, tuple[str, float]] = {}  # (txt_id, fetched_at) of the row last read/written

    # ----- public API ----------------------------------------------------------------------

    async def get(self, domain: str) -> CacheEntry | None:
        """The cached entry for `domain` (fresh or expired; the caller decides), or None.

        Raises CacheError while the table cannot be read; `peek` still gives what is in memory.
        """
        if not self._loaded:
            await self._load()
        return self._entries.get(domain.lower())

    def damage(self, domain: str) -> str | None:
        """Why `domain`'s stored row could not be read, or why the table could not; None if fine."""
        row = self._row_damage(domain)
        if row is None and self._load_error is not None:
            return f"policy cache unreadable: {self._load_error}"
        return row

    async def put(self, entry: CacheEntry, expected: CacheEntry | object | None = ANY) -> bool:
        """Store `entry` unless that would roll back a newer one; True if it was stored.

        `expected` is the entry the caller's decision was based on (None: there was none). The
        write goes ahead when the current entry is still `expected`, or when `entry` comes from
        a later fetch than the current one (see `supersedes`). Without `expected` only the second
        rule applies (a same-time write counts as newer).

        Memory is updated first, so this process keeps using the entry even if the database
        cannot be read or written; such a failure is raised as CacheError for the caller to log.
        """
        unreadable: CacheError | None = None
        if not self._loaded:
            try:
                await self._load()
            except CacheError as exc:
                unreadable = exc  # keep the entry in memory all the same, then say so
        domain = self._replace(entry, expected)
        if domain is None:
            return False
        if unreadable is not None:
            raise unreadable
        await self._run(self._write_row, domain)
        return True

    async def all(self) -> list[CacheEntry]:
        """Every cached entry, sorted by domain."""
        if not self._loaded:
            await self._load()
        return self._sorted()

    async def touch(self, domain: str, now: float) -> None:
        """Note that mail was sent to `domain` at `now` (selects domains for proactive refresh)."""
        if not self._loaded:
            await self._load()
        due = self._note_use(domain, now)
        if due is not None:
            await self._run(self._write_last_used, due, now)

    async def close(self) -> None:
        """Close the database; the cache must not be used afterwards."""
        self._closed = True
        await asyncio.to_thread(self._close_conn)

    # ----- blocking helpers (run in a worker thread) ---------------------------------------

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        if self._closed:
            raise CacheError(f"policy cache {self.path} is closed")
        try:
            return await asyncio.to_thread(self._locked, fn, *args)
        except (sqlite3.Error, OSError) as exc:
            raise CacheError(f"policy cache {self.path}: {exc}") from exc

    def _locked(self, fn: Callable[..., T], *args: object) -> T:
        with self._lock:
            return fn(*args)

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            # WAL: readers (the CLI) never block the relay; WAL + NORMAL is durable across a process crash.
            self._conn = open_wal(self.path, schema=_SCHEMA, synchronous="NORMAL")
        return self._conn

    async def _load(self) -> None:
        async with self._load_lock:
            if self._loaded:
                return
            try:
                rows = await self._run(self._read_all)
            except CacheError as exc:
                self._load_error = str(exc)
                raise
            self._load_error = None
            for row in rows:
                entry, why = _entry_from_row(row)
                if entry is None:
                    self._damaged[str(row[0]).lower()] = why
                    continue
                self._on_disk[entry.domain] = (entry.txt_id, entry.fetched_at)
                # Entries put while the table could not be read stay unless the row is newer.
                if supersedes(entry, self._entries.get(entry.domain), None):
                    self._entries[entry.domain] = entry
                if row[8] is not None:
                    self._last_used.setdefault(entry.domain, float(row[8]))
                    self._last_used_written.setdefault(entry.domain, float(row[8]))
            self._loaded = True

    def _read_all(self) -> list[tuple[Any, ...]]:
        return list(self._connection().execute(f"SELECT {_COLUMNS} FROM policies"))

    def _write_row(self, domain: str) -> None:
        entry = self._entries.get(domain)  # the newest state, even if a later put overtook us
        if entry is None:
            return
        last_txt, last_at = self._on_disk.get(domain, (None, None))
        # Compare-and-set on disk too: never replace a row from a later fetch (another process's),
        # unless it is the row we last read or wrote, or it is damaged (then anything is better).
        cursor = self._connection().execute(
            f"INSERT INTO policies ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (domain) DO UPDATE SET txt_id = excluded.txt_id, policy_text = excluded.policy_text, "
            "dialect = excluded.dialect, fetched_at = excluded.fetched_at, expires_at = excluded.expires_at, "
            "failed_id = excluded.failed_id, failed_at = excluded.failed_at, last_used_at = excluded.last_used_at "
            "WHERE typeof(policies.fetched_at) NOT IN ('real', 'integer') "
            "OR policies.fetched_at <= excluded.fetched_at "
            "OR (policies.txt_id IS ? AND policies.fetched_at IS ?) OR ?",
            (
                domain,
                entry.txt_id,
                policy_to_text(entry.policy),
                entry.policy.dialect,
                entry.fetched_at,
                entry.expires_at,
                entry.failed_id,
                entry.failed_at,
                self._last_used.get(domain),
                last_txt,
                last_at,
                domain in self._damaged,
            ),
        )
        if cursor.rowcount == 1:
            self._on_disk[domain] = (entry.txt_id, entry.fetched_at)
            self._damaged.pop(domain, None)
        else:
            log.error("policy cache %s: not overwriting the newer stored policy of %s", self.path, domain)

    def _write_last_used(self, domain: str, now: float) -> None:
        self._connection().execute("UPDATE policies SET last_used_at = ? WHERE domain = ?", (now, domain))

    def _close_conn(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def supersedes(new: CacheEntry, current: CacheEntry | None, expected: CacheEntry | object | None = ANY) -> bool:
    """Whether writing `new` over `current` is allowed (compare-and-set, issue 10 item 2).

    Allowed when nothing is cached, when `current` is still the `expected` entry the writer
    decided from, or when `new` comes from a later fetch. An entry from an older fetch (a stale
    snapshot marked as failed, say) never replaces a newer one. Without `expected`, a write from
    the same fetch time also goes ahead.
    """
    if current is None:
        return True
    if expected is not ANY:
        return current == expected or new.fetched_at > current.fetched_at
    return new.fetched_at >= current.fetched_at


def _entry_from_row(row: tuple[Any, ...]) -> tuple[CacheEntry | None, str]:
    """(entry, "") for a good row, (None, why) for one that no longer parses (logged as an error)."""
    domain, txt_id, text, dialect, fetched_at, expires_at, failed_id, failed_at, _used = row
    try:
        policy = parse_policy(str(text), dialect=str(dialect))
        return CacheEntry(
            domain=str(domain).lower(),
            txt_id=str(txt_id),
            policy=policy,
            fetched_at=float(fetched_at),
            expires_at=float(expires_at),
            failed_id=None if failed_id is None else str(failed_id),
            failed_at=None if failed_at is None else float(failed_at),
        ), ""
    except (StsPolicyError, TypeError, ValueError) as exc:
        log.error("policy cache: the stored policy of %r is unreadable and is not applied: %s", domain, exc)
        return None, str(exc)
