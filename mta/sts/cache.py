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

A row that no longer parses (edited by hand, written by a newer version) is ignored with a
warning rather than failing the relay; the next fetch overwrites it.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from mta.db import open_wal
from mta.errors import MtaError, StsPolicyError
from mta.sts.decide import CacheEntry
from mta.sts.policy import parse_policy, policy_to_text

log = logging.getLogger(__name__)

T = TypeVar("T")

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


class PolicyCache:
    """Policy cache at `path` (created if missing). Coroutine methods; call `close()` when done."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()  # one sqlite3 connection, used by one worker thread at a time
        self._conn: sqlite3.Connection | None = None
        self._entries: dict[str, CacheEntry] = {}
        self._last_used: dict[str, float] = {}
        self._last_used_written: dict[str, float] = {}
        self._loaded = False
        self._load_lock = asyncio.Lock()
        self._closed = False

    # ----- public API ----------------------------------------------------------------------

    async def get(self, domain: str) -> CacheEntry | None:
        """The cached entry for `domain` (fresh or expired; the caller decides), or None."""
        if not self._loaded:
            await self._load()
        return self._entries.get(domain.lower())

    async def put(self, entry: CacheEntry) -> None:
        """Store `entry`, replacing any previous one for its domain.

        Memory is updated first, so this process keeps using the entry even if the disk write
        fails; the failure is raised as CacheError for the caller to log.
        """
        if not self._loaded:
            await self._load()
        domain = entry.domain.lower()
        self._entries[domain] = entry
        await self._run(self._write_row, domain)

    async def all(self) -> list[CacheEntry]:
        """Every cached entry, sorted by domain."""
        if not self._loaded:
            await self._load()
        return [self._entries[d] for d in sorted(self._entries)]

    async def touch(self, domain: str, now: float) -> None:
        """Note that mail was sent to `domain` at `now` (selects domains for proactive refresh)."""
        if not self._loaded:
            await self._load()
        domain = domain.lower()
        self._last_used[domain] = now
        if domain in self._entries and now - self._last_used_written.get(domain, float("-inf")) >= TOUCH_WRITE_INTERVAL:
            self._last_used_written[domain] = now
            await self._run(self._write_last_used, domain, now)

    def size(self) -> int:
        """How many policies are cached (in memory; 0 before the first lookup loads the file)."""
        return len(self._entries)

    def last_used(self, domain: str) -> float | None:
        """When mail last went to `domain` (None if never, as far as this cache knows)."""
        return self._last_used.get(domain.lower())

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
            rows = await self._run(self._read_all)
            for row in rows:
                entry = _entry_from_row(row)
                if entry is not None:
                    self._entries.setdefault(entry.domain, entry)
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
        self._connection().execute(
            f"INSERT OR REPLACE INTO policies ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
            ),
        )

    def _write_last_used(self, domain: str, now: float) -> None:
        self._connection().execute("UPDATE policies SET last_used_at = ? WHERE domain = ?", (now, domain))

    def _close_conn(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def _entry_from_row(row: tuple[Any, ...]) -> CacheEntry | None:
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
        )
    except (StsPolicyError, TypeError, ValueError) as exc:
        log.warning("policy cache: ignoring unreadable entry for %r: %s", domain, exc)
        return None
