"""The shared PostgreSQL of a cluster (issue 15): connection pool, schema versions, and outages.

Rule: the database is never in the mail path. Callers (the policy-cache sync, the TLS-RPT
flush, the heartbeat) run in background tasks and go through `run()`, which either gets a
pooled connection at once or raises DatabaseUnavailable. The first failure marks the database
down: one log line (event `database`, status `unreachable`), the pool is dropped, and a probe
reconnects every `retry_interval` seconds; when it succeeds the schema is checked again, a new
pool is opened and one line (status `reachable`) says so. A start with the database down or a
wrong URL is the same case: logged clearly and retried, mail flows meanwhile (CLU-4, CLU-5).

Schema versions live here, in code: `MIGRATIONS[n]` takes the schema from version n to n+1.
Every start (and every reconnect) runs the missing ones in one transaction under a
transaction-scoped advisory lock, so nodes starting together neither race nor half-migrate. A
database whose version is newer than this mta knows is refused with one line (SchemaTooNew).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from mta.errors import MtaError

_log = logging.getLogger("mta.cluster")
T = TypeVar("T")

ADVISORY_LOCK_KEY = 0x6D74_6100_0015  # any fixed bigint; only mta takes it
STILL_DOWN_LOG_INTERVAL = 60.0  # seconds between "still unreachable" lines during a long outage

_V1 = """
CREATE TABLE mta_sts_policies (
    domain text PRIMARY KEY, txt_id text NOT NULL, policy_text text NOT NULL,
    dialect text NOT NULL DEFAULT 'rfc8461', fetched_at double precision NOT NULL,
    expires_at double precision NOT NULL, failed_id text, failed_at double precision,
    last_used_at double precision, node text NOT NULL DEFAULT '', rev bigserial NOT NULL);
CREATE INDEX mta_sts_policies_rev ON mta_sts_policies (rev);
CREATE TABLE mta_tlsrpt_sessions (
    day text NOT NULL, domain text NOT NULL, policy_type text NOT NULL, policy_text text NOT NULL,
    successful bigint NOT NULL DEFAULT 0, failed bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (day, domain, policy_type, policy_text));
CREATE TABLE mta_tlsrpt_failures (
    day text NOT NULL, domain text NOT NULL, policy_type text NOT NULL, policy_text text NOT NULL,
    result_type text NOT NULL, sending_ip text NOT NULL, mx_host text NOT NULL, receiving_ip text NOT NULL,
    reason_code text NOT NULL, count bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (day, domain, policy_type, policy_text, result_type, sending_ip, mx_host, receiving_ip,
                 reason_code));
CREATE TABLE mta_tlsrpt_batches (
    batch_id text PRIMARY KEY, day text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE mta_tlsrpt_sent (
    day text NOT NULL, domain text NOT NULL, report_id text NOT NULL, claimed_at double precision NOT NULL,
    status text NOT NULL, detail text NOT NULL DEFAULT '', node text NOT NULL DEFAULT '',
    lease_until timestamptz NOT NULL, PRIMARY KEY (day, domain));
CREATE TABLE mta_tlsrpt_post_retries (
    day text NOT NULL, domain text NOT NULL, url text NOT NULL, report_id text NOT NULL, body bytea NOT NULL,
    first_failed double precision NOT NULL, tries integer NOT NULL, next_try double precision NOT NULL,
    last_error text NOT NULL, PRIMARY KEY (day, domain, url));
CREATE TABLE mta_nodes (
    name text PRIMARY KEY, started_at timestamptz NOT NULL, heartbeat_at timestamptz NOT NULL,
    summary jsonb NOT NULL);
"""
MIGRATIONS: tuple[str, ...] = (_V1,)
SCHEMA_VERSION = len(MIGRATIONS)

# Errors that mean "cannot talk to the database now", as opposed to a bug in a statement.
_DOWN = (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout, OSError, TimeoutError)


class ClusterError(MtaError):
    """The cluster database refused a statement, or cannot be used by this mta."""


class DatabaseUnavailable(ClusterError):
    """The cluster database cannot be reached now; the caller keeps its data for later."""


class SchemaTooNew(ClusterError):
    """The database was set up by a newer mta (one line; the node refuses to use it)."""


def redact(url: str) -> str:
    """The URL without its password, for logs and errors (secrets never in logs)."""
    url = re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)
    return re.sub(r"(?i)(password=)[^&\s]*", r"\1***", url)


async def migrate(conn: psycopg.AsyncConnection[Any]) -> int:
    """Bring the schema to SCHEMA_VERSION under the advisory lock; returns the version found."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (ADVISORY_LOCK_KEY,))
        await conn.execute("CREATE TABLE IF NOT EXISTS mta_schema "
                           "(id integer PRIMARY KEY CHECK (id = 1), version integer NOT NULL)")
        row = await (await conn.execute("SELECT version FROM mta_schema WHERE id = 1")).fetchone()
        found = int(row[0]) if row else 0
        if found > SCHEMA_VERSION:
            raise SchemaTooNew(f"cluster.database: schema version {found} was written by a newer mta "
                               f"(this one knows up to {SCHEMA_VERSION}); upgrade mta on this node")
        for version in range(found, SCHEMA_VERSION):
            await conn.execute(MIGRATIONS[version])  # type: ignore[arg-type]  # constant text
        await conn.execute("INSERT INTO mta_schema (id, version) VALUES (1, %s) "
                           "ON CONFLICT (id) DO UPDATE SET version = excluded.version", (SCHEMA_VERSION,))
    return found


class ClusterDb:
    """One node's handle on the shared database (see the module rule)."""

    def __init__(self, url: str, node: str, *, retry_interval: float = 2.0, op_timeout: float = 5.0,
                 pool_size: int = 4, on_state: Callable[[bool], None] | None = None) -> None:
        self.url = url
        self.on_state = on_state  # told True/False on every change (the mta_cluster_database_up gauge)
        self.node = node
        self.retry_interval = retry_interval
        self.op_timeout = op_timeout
        self.pool_size = pool_size
        self._pool: AsyncConnectionPool[Any] | None = None
        self._reason = "not connected yet"
        self._probe: asyncio.Task[None] | None = None
        self._closed = False
        self._fatal: str | None = None
        self._last_down_log = 0.0
        self._listeners: list[Callable[[], None]] = []

    @property
    def available(self) -> bool:
        """Whether the last use of the database worked (for logs, metrics and `/readyz` details)."""
        return self._pool is not None

    @property
    def reason(self) -> str:
        return self._fatal or self._reason

    def on_reconnect(self, callback: Callable[[], None]) -> None:
        """Call `callback` each time the database becomes reachable (e.g. to wake a writer)."""
        self._listeners.append(callback)

    async def start(self, wait: float = 3.0) -> bool:
        """Connect and migrate within `wait` seconds; else log it and keep trying in the background.

        Returns whether the database is usable now. Raises SchemaTooNew (the node must not start).
        """
        try:
            await asyncio.wait_for(self._connect(), wait)
        except SchemaTooNew:
            raise
        except (*_DOWN, psycopg.Error) as exc:
            self._mark_down(exc)
        return self.available

    async def run(self, fn: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]]) -> T:
        """`fn(connection)` on a pooled connection (autocommit); DatabaseUnavailable when down."""
        pool = self._pool
        if pool is None:
            raise DatabaseUnavailable(f"database unreachable: {self.reason}")
        try:
            async with pool.connection(timeout=self.op_timeout) as conn:
                return await asyncio.wait_for(fn(conn), self.op_timeout)
        except _DOWN as exc:
            self._mark_down(exc)
            raise DatabaseUnavailable(f"database unreachable: {self.reason}") from exc
        except psycopg.Error as exc:
            raise ClusterError(f"cluster database: {type(exc).__name__}: {exc}".strip()) from exc

    async def close(self) -> None:
        self._closed = True
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close(timeout=2.0)

    # -- connecting --------------------------------------------------------------------------

    async def _connect(self) -> None:
        # One plain connection first: its error says why (refused, auth, no such database), where
        # a pool would only time out.
        conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True,
                                                     connect_timeout=max(2, int(self.op_timeout)))
        try:
            await migrate(conn)
        finally:
            await conn.close()
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            self.url, min_size=1, max_size=self.pool_size, open=False, name=f"mta-{self.node}",
            kwargs={"autocommit": True, "connect_timeout": max(2, int(self.op_timeout))},
            check=AsyncConnectionPool.check_connection)  # a connection from before a DB restart is replaced
        try:
            await pool.open(wait=True, timeout=self.op_timeout)
        except BaseException:
            await pool.close(timeout=1.0)  # its workers would keep trying in the background
            raise
        if self._closed:
            await pool.close()
            return
        was_down = self._probe is not None or self._reason != "not connected yet"
        self._pool = pool
        self._probe = None
        self._event(logging.INFO, "reachable" if was_down else "connected", None)
        if self.on_state is not None:
            self.on_state(True)
        for callback in self._listeners:
            callback()

    def _mark_down(self, exc: BaseException) -> None:
        self._reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:300] or type(exc).__name__
        if self._pool is not None:
            pool, self._pool = self._pool, None
            asyncio.get_running_loop().create_task(pool.close(timeout=1.0))
        if self._probe is None and not self._closed:
            self._event(logging.WARNING, "unreachable", self._reason)
            if self.on_state is not None:
                self.on_state(False)
            self._last_down_log = asyncio.get_running_loop().time()
            self._probe = asyncio.get_running_loop().create_task(self._probe_loop())

    async def _probe_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closed:
            await asyncio.sleep(self.retry_interval)
            try:
                await asyncio.wait_for(self._connect(), self.op_timeout + 2)
                return
            except SchemaTooNew as exc:
                self._fatal = str(exc)
                self._event(logging.ERROR, "refused", str(exc))
                return  # a newer schema stays newer: no use retrying
            except (*_DOWN, psycopg.Error) as exc:
                self._reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
                if loop.time() - self._last_down_log >= STILL_DOWN_LOG_INTERVAL:
                    self._last_down_log = loop.time()
                    self._event(logging.WARNING, "unreachable", self._reason)

    def _event(self, level: int, status: str, reason: str | None) -> None:
        # The same shape as mta.log events, so text and JSON logs both show it as one line.
        with contextlib.suppress(Exception):
            _log.log(level, "database", extra={"mta_event": {
                "event": "database", "status": status, "node": self.node, "database": redact(self.url),
                "reason": reason, "retry_in": self.retry_interval if status == "unreachable" else None}})
