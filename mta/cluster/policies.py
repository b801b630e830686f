"""The MTA-STS policy cache of a cluster, on PostgreSQL (issue 15, CLU-1, CLU-2).

Rule: the same contract as `mta.sts.cache.PolicyCache` (the PolicyStore protocol), but every
lookup is served from memory and never waits on the database (CLU-4). A background task
(`run`) does the I/O every `sync_interval` seconds, and at once after a `put`:
- writes the domains put here (and last-use times, at most once a minute per domain) with
  compare-and-set: a stored row is replaced only by a row from a later (or the same) fetch, or
  when it is still the row this node last read or wrote, so a newer policy is never replaced by
  an older one, whichever node writes (issue 10 item 2 across nodes);
- reads the rows changed since its last read (`rev`, from a sequence bumped by every write) and
  every FULL_RELOAD_INTERVAL the whole table (a write whose `rev` commits after a larger one
  would otherwise be skipped), and adopts a row when it comes from a later (or the same) fetch
  than what memory holds. So a policy fetched by one node protects every node within about a
  sync interval, also when the other nodes cannot reach the policy host (downgrade resistance).

While the database is down nothing changes for mail: memory keeps applying, puts stay marked
dirty and are written when it returns. A row that no longer parses is reported as damage, like
in the SQLite cache, until a fetch replaces it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from typing import Any

import psycopg

from mta.cluster.db import ClusterDb, ClusterError
from mta.sts.cache import ANY, CacheError, InMemoryPolicies, _entry_from_row, supersedes
from mta.sts.decide import CacheEntry
from mta.sts.policy import policy_to_text

_log = logging.getLogger("mta.cluster")

FULL_RELOAD_INTERVAL = 30.0
_COLUMNS = "domain, txt_id, policy_text, dialect, fetched_at, expires_at, failed_id, failed_at, last_used_at"
_WRITE = (
    f"INSERT INTO mta_sts_policies ({_COLUMNS}, node) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
    "ON CONFLICT (domain) DO UPDATE SET txt_id = excluded.txt_id, policy_text = excluded.policy_text, "
    "dialect = excluded.dialect, fetched_at = excluded.fetched_at, expires_at = excluded.expires_at, "
    "failed_id = excluded.failed_id, failed_at = excluded.failed_at, "
    "last_used_at = GREATEST(mta_sts_policies.last_used_at, excluded.last_used_at), node = excluded.node, "
    "rev = nextval('mta_sts_policies_rev_seq') "
    "WHERE mta_sts_policies.fetched_at <= excluded.fetched_at "
    "OR (mta_sts_policies.txt_id = %s AND mta_sts_policies.fetched_at = %s) OR %s "
    "RETURNING rev"
)


class PgPolicyCache(InMemoryPolicies):
    """Policy cache shared by the nodes of a cluster (see the module rule)."""

    def __init__(self, db: ClusterDb, *, sync_interval: float = 1.0) -> None:
        super().__init__()
        self.db = db
        self.sync_interval = sync_interval
        self._on_db: dict[str, tuple[str, float]] = {}  # (txt_id, fetched_at) of the row last read/written
        self._dirty: set[str] = set()
        self._touched: dict[str, float] = {}
        self._rev = 0
        self._last_full = -math.inf
        self._wake = asyncio.Event()
        self._sync_lock = asyncio.Lock()
        db.on_reconnect(self._wake.set)

    # ----- PolicyStore: memory only ----------------------------------------------------------

    async def get(self, domain: str) -> CacheEntry | None:
        return self.peek(domain)

    def damage(self, domain: str) -> str | None:
        return self._row_damage(domain)

    async def put(self, entry: CacheEntry, expected: CacheEntry | object | None = ANY) -> bool:
        domain = self._replace(entry, expected)
        if domain is None:
            return False
        self._dirty.add(domain)
        self._wake.set()  # other nodes should see a new policy soon
        return True

    async def all(self) -> list[CacheEntry]:
        return self._sorted()

    async def touch(self, domain: str, now: float) -> None:
        due = self._note_use(domain, now)
        if due is not None:
            self._touched[due] = now

    async def close(self) -> None:
        """Write what is still dirty, if the database answers; the database itself is closed by its owner."""
        with contextlib.suppress(ClusterError):
            await self.sync_once()

    # ----- I/O --------------------------------------------------------------------------------

    async def load(self) -> None:
        """Read the whole table now (the CLI); CacheError when the database cannot be read."""
        try:
            await self.sync_once(full=True)
        except ClusterError as exc:
            raise CacheError(f"cluster policy cache: {exc}") from exc

    async def run(self, stop: asyncio.Event) -> None:
        """Sync every `sync_interval` seconds (sooner after a put) until `stop` is set."""
        while not stop.is_set():
            with contextlib.suppress(ClusterError):  # outages are logged once by ClusterDb
                await self.sync_once()
            self._wake.clear()
            waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._wake.wait())]
            await asyncio.wait(waits, timeout=self.sync_interval, return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()

    async def sync_once(self, full: bool = False) -> None:
        """Write dirty rows, then read changed ones; raises ClusterError (DatabaseUnavailable) on failure."""
        async with self._sync_lock:
            dirty, self._dirty = self._dirty, set()
            touched, self._touched = self._touched, {}
            try:
                await self.db.run(lambda conn: self._write(conn, dirty, touched))
            except BaseException:
                self._dirty |= dirty  # written when the database returns
                for domain, at in touched.items():
                    self._touched.setdefault(domain, at)
                raise
            loop = asyncio.get_running_loop()
            full = full or loop.time() - self._last_full >= FULL_RELOAD_INTERVAL
            rows = await self.db.run(lambda conn: self._read(conn, full))
            if full:
                self._last_full = loop.time()
            self._apply(rows)

    async def _write(self, conn: psycopg.AsyncConnection[Any], dirty: set[str], touched: dict[str, float]) -> None:
        for domain in sorted(dirty):
            entry = self._entries.get(domain)  # the newest state, even if later puts overtook the first
            if entry is None:
                continue
            last_txt, last_at = self._on_db.get(domain, (None, None))
            cur = await conn.execute(_WRITE, (
                domain, entry.txt_id, policy_to_text(entry.policy), entry.policy.dialect, entry.fetched_at,
                entry.expires_at, entry.failed_id, entry.failed_at, self._last_used.get(domain), self.db.node,
                last_txt, last_at, domain in self._damaged))
            row = await cur.fetchone()
            if row is None:
                _log.info("cluster policy cache: another node stored a newer policy of %s; it is kept", domain)
                continue
            self._on_db[domain] = (entry.txt_id, entry.fetched_at)
            self._damaged.pop(domain, None)
        for domain, at in touched.items():
            await conn.execute("UPDATE mta_sts_policies SET last_used_at = GREATEST(last_used_at, %s) "
                               "WHERE domain = %s", (at, domain))

    async def _read(self, conn: psycopg.AsyncConnection[Any], full: bool) -> list[tuple[Any, ...]]:
        if full:
            cur = await conn.execute(f"SELECT {_COLUMNS}, rev FROM mta_sts_policies")
        else:
            cur = await conn.execute(f"SELECT {_COLUMNS}, rev FROM mta_sts_policies WHERE rev > %s", (self._rev,))
        return list(await cur.fetchall())

    def _apply(self, rows: list[tuple[Any, ...]]) -> None:
        for row in rows:
            self._rev = max(self._rev, int(row[9]))
            entry, why = _entry_from_row(tuple(row[:9]))
            if entry is None:
                self._damaged[str(row[0]).lower()] = why
                continue
            self._damaged.pop(entry.domain, None)
            self._on_db[entry.domain] = (entry.txt_id, entry.fetched_at)
            if supersedes(entry, self._entries.get(entry.domain), None):
                self._entries[entry.domain] = entry
            if row[8] is not None:
                self._last_used.setdefault(entry.domain, float(row[8]))
                self._last_used_written.setdefault(entry.domain, float(row[8]))
