"""A real PostgreSQL for the cluster tests (issue 15): Debian's binaries, a private data folder.

    server = PostgresServer().start()     # initdb into a temp folder, pg_ctl start on a free loopback port
    url = server.create_database("t1")    # postgresql://postgres@127.0.0.1:PORT/t1
    server.stop(); server.start()         # the same port and data: a database restart
    server.destroy()

PostgreSQL refuses to run as root, so as root every server command runs as the `postgres` user
(`runuser -u postgres --`), in a folder that user owns. `pg_server` (session) starts one server
for the run; `pg_url` gives each test its own database on it. A server that cannot start fails
the test with the reason (never a silent skip); `.ci/run` installs the `postgresql` package.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.support.relay import free_port


class PostgresUnavailable(RuntimeError):
    pass


def find_bindir() -> Path:
    """The newest /usr/lib/postgresql/N/bin holding initdb and pg_ctl."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if not found:
        raise PostgresUnavailable("no /usr/lib/postgresql/*/bin/initdb: install Debian's postgresql package "
                                  "(apt-get install -y postgresql; .ci/run does it)")
    return Path(found[-1]).parent


class PostgresServer:
    def __init__(self) -> None:
        self.bindir = find_bindir()
        self.as_root = os.geteuid() == 0
        self.root = Path(tempfile.mkdtemp(prefix="mta-pg-", dir="/tmp"))
        self.data = self.root / "data"
        self.port = free_port()
        if self.as_root:
            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self.root.chmod(0o700)
        self._initialised = False
        self.running = False

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=self.root)
        if out.returncode != 0:
            log = self.root / "server.log"
            tail = ""
            with contextlib.suppress(OSError):
                tail = subprocess.run(["tail", "-n", "20", str(log)], capture_output=True, text=True).stdout
            raise PostgresUnavailable(f"{' '.join(args)} failed ({out.returncode}): {out.stdout}{out.stderr}{tail}")
        return out

    def start(self) -> PostgresServer:
        if not self._initialised:
            # trust on loopback only: a throwaway server for the tests; --no-sync: nothing to keep.
            self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                      "--no-sync", "--no-instructions")
            self._initialised = True
        opts = (f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=100")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-o", opts, "-w", "-t", "30",
                  "start")
        self.running = True
        return self

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "30", "stop")
        self.running = False

    def destroy(self) -> None:
        with contextlib.suppress(PostgresUnavailable, subprocess.TimeoutExpired):
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "-t", "30", "stop")
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str | None = None) -> str:
        name = name or "t_" + secrets.token_hex(6)
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]  # our own generated name
        return self.url(name)

    def drop_database(self, url: str) -> None:
        name = url.rsplit("/", 1)[1]
        with contextlib.suppress(psycopg.Error), psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # type: ignore[arg-type]


def started_server() -> PostgresServer:
    """A started server, or the test fails saying why (no silent skip)."""
    try:
        return PostgresServer().start()
    except (PostgresUnavailable, OSError, KeyError, subprocess.TimeoutExpired) as exc:
        pytest.fail(f"PostgreSQL could not be started for this test: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    server = started_server()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture
def pg_url(pg_server: PostgresServer) -> Iterator[str]:
    """A fresh database on the session's server, dropped afterwards (a test that stopped the
    server to simulate an outage gets it started again here)."""
    url = pg_server.create_database()
    try:
        yield url
    finally:
        if not pg_server.running:
            pg_server.start()
        pg_server.drop_database(url)


@pytest.fixture
def own_pg() -> Iterator[PostgresServer]:
    """A server of this test alone, for tests that stop and start it (not started yet: call .start())."""
    try:
        server = PostgresServer()
    except (PostgresUnavailable, OSError, KeyError) as exc:
        pytest.fail(f"PostgreSQL cannot be set up for this test: {exc}", pytrace=False)
    try:
        yield server
    finally:
        server.destroy()
