"""Opening the small SQLite tables (policy cache, TLS-RPT counters) shared by the server and the CLI.

Rule: WAL mode, so a reader in one process never blocks a writer in another, and a busy timeout
for writers. Switching to WAL can fail with "database is locked" at once (SQLite does not wait on
the busy timeout there) while another process is opening the same file, so that step is retried
until the timeout.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path


def open_wal(path: str | Path, *, schema: str, timeout: float = 10.0, synchronous: str = "FULL") -> sqlite3.Connection:
    """A connection in autocommit mode (isolation_level None), WAL on, `schema` applied."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), timeout=timeout, isolation_level=None, check_same_thread=False)
    deadline = time.monotonic() + timeout
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
        while True:
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute(f"PRAGMA synchronous = {synchronous}")
                conn.executescript(schema)
                return conn
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
    except BaseException:
        conn.close()
        raise
