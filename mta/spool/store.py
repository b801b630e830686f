"""The durable spool: one folder, two files per message, commit point = atomic rename.

Layout under `[queue] path`:
    msg/<id>.eml    the message bytes, exactly as they will be sent
    msg/<id>.json   the envelope and per-recipient state (MessageMeta, JSON with a schema number)
    tmp/            files being written; anything here at start-up is debris and is removed
    corrupt/        meta files that could not be parsed, each with its data file (kept for the
                    operator, never retried)
    ctl/            requests from the CLI to a running server (see control.py)
    lock            flock()ed by the one `mta serve` that owns the spool

Failure model (what a crash at any moment leaves, cf. maddy's queue):
- `put`: data and meta are written and fsync'ed in tmp/, renamed into msg/ (data first), then
  msg/ is fsync'ed. Only after that directory fsync does the caller answer 250. A crash before
  it leaves at most an orphan pair in tmp/ or msg/ for a message that was never acknowledged:
  start-up removes a data file without meta and a meta without data.
- `update`: the new meta is written to tmp/, fsync'ed and renamed over the old one, so a reader
  sees the old or the new state, never a torn file.
- `remove`: the meta goes first (it is the commit point), then the data.
- A full disk (ENOSPC) makes `put` and `update` raise SpoolError("spool disk is full") and leaves
  no debris: a refused `put` stores nothing, a failed `update` leaves the previous state file.
  Submissions (`put(..., reserve=SUBMISSION_RESERVE)`) are refused while less than the reserve
  would remain, so state updates and DSNs of mail already accepted still fit when clients are
  what fills the disk (cf. Postfix's queue_minfree).

All blocking calls run in worker threads (asyncio.to_thread) so the event loop never waits on
the disk. Directory fsyncs of concurrent writers are coalesced (group commit): one fsync covers
every rename made before it started, and no caller returns before a covering fsync finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from mta.errors import CorruptEntry, SpoolError
from mta.spool.state import MessageMeta, Recipient

log = logging.getLogger("mta.spool")

# Bytes a submission must leave free: room for a few hundred state rewrites and DSNs.
SUBMISSION_RESERVE = 1 << 20
# What one message costs besides its data: the meta file, rounded up to common block sizes.
_META_ALLOWANCE = 8192
# Test hook only (issue 17): MTA_UNSAFE_SKIP_FSYNC=dir and/or file (comma-separated) skips that
# flush, so the power-cut test (tests/e2e/test_powercut.py) can prove it sees the loss. Unset in
# production: with it, acknowledged mail does not survive a power cut.
_UNSAFE_SKIP_FSYNC = frozenset(os.environ.get("MTA_UNSAFE_SKIP_FSYNC", "").split(",")) - {""}


def new_id(now: float) -> str:
    """Sortable, unique queue id: milliseconds since the epoch plus 40 random bits, hex."""
    return f"{int(now * 1000):011X}{secrets.token_hex(5).upper()}"


def id_created(qid: str) -> float:
    """The arrival time a queue id starts with (see new_id); 0.0 for anything else."""
    try:
        return int(qid[:11], 16) / 1000
    except ValueError:
        return 0.0


class _GroupSync:
    """Coalesces fsync() calls on one directory across concurrent writer threads (group commit).

    Called in the writer's own thread right after its renames: if an fsync is already running it
    may have started before those renames, so the caller waits for the NEXT one, which one of the
    waiting threads starts and which covers every rename made before it began.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._cv = threading.Condition()
        self._requested = 0
        self._completed = 0
        self._running = False
        self._error: OSError | None = None

    def _fsync(self) -> None:
        if "dir" in _UNSAFE_SKIP_FSYNC:
            return
        fd = os.open(self._path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def sync(self) -> None:
        """Return once an fsync that started after this call has finished; raise its OSError."""
        with self._cv:
            self._requested += 1
            target = self._requested
            while self._completed < target:
                if self._running:
                    self._cv.wait()
                    continue
                self._running = True
                covers = self._requested
                error: OSError | None = None
                self._cv.release()
                try:
                    self._fsync()
                except OSError as exc:
                    error = exc
                finally:
                    self._cv.acquire()
                    self._running = False
                    self._cv.notify_all()
                if error is not None:
                    raise error
                self._completed = max(self._completed, covers)


class SpoolStore:
    """Owns the spool folder: put, load, update and remove messages durably."""

    def __init__(self, path: str | Path) -> None:
        self.root = Path(path)
        self.msg = self.root / "msg"
        self.tmp = self.root / "tmp"
        self.corrupt = self.root / "corrupt"
        self.ctl = self.root / "ctl"
        self._lock_fd: int | None = None
        self._dirsync = _GroupSync(self.msg)

    # -- setup ---------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Create the folders; raise SpoolError with a clear reason if that is impossible."""
        try:
            created = False
            for d in (self.root, self.msg, self.tmp, self.corrupt, self.ctl):
                if not d.is_dir():
                    d.mkdir(parents=True, exist_ok=True)
                    created = True
            if created:
                # A new folder's name is durable only once its parent is flushed: without this a
                # power cut soon after the first start takes the whole spool, acknowledged mail and
                # all (found by tests/e2e/test_powercut.py).
                for d in (*reversed(self.root.resolve().parents), self.root):
                    with contextlib.suppress(OSError):
                        _fsync_dir(d)
            probe = self.tmp / f".probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise SpoolError(f"spool {self.root} is not writable: {_unusable(exc)}") from None

    def lock(self) -> None:
        """Take the spool lock; a second `mta serve` on the same spool refuses to start."""
        self.prepare()
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            other = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise SpoolError(f"spool {self.root} is in use by another mta (pid {other})") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd
        if _UNSAFE_SKIP_FSYNC:
            log.warning("spool: MTA_UNSAFE_SKIP_FSYNC=%s (test hook): acknowledged mail will not survive a "
                        "power cut", ",".join(sorted(_UNSAFE_SKIP_FSYNC)))

    def hold_writer_lock(self) -> int:
        """A submission child holds this (shared) for its whole life; see wait_for_writers."""
        fd = os.open(self.root / "lock.writers", os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_SH)
        return fd

    def wait_for_writers(self, timeout: float = 10.0) -> None:
        """Wait until no submission child of an earlier (killed) server is still writing.

        Start-up recovery deletes half-written files; a dying child of a SIGKILLed server could
        otherwise finish a put concurrently and lose its files to the scan.
        """
        with self.writers_excluded(timeout):
            pass

    @contextlib.contextmanager
    def writers_excluded(self, timeout: float = 10.0) -> Iterator[None]:
        """Hold the writers' lock exclusively: no submission child and no `sendmail` writes meanwhile.

        Start-up recovery runs inside it, so a `sendmail` started while `mta serve` starts waits
        instead of losing its half-written files to the scan."""
        fd = os.open(self.root / "lock.writers", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise SpoolError(f"spool {self.root}: an old submission process is still running") from None
                    time.sleep(0.02)
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def writing(self, timeout: float = 30.0) -> Iterator[None]:
        """Hold the writers' lock shared for one outside writer (`sendmail`): waits while a starting
        server recovers the spool; SpoolError after `timeout`."""
        try:
            fd = os.open(self.root / "lock.writers", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise SpoolError(describe_os_error(exc)) from None
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise SpoolError(f"spool {self.root}: busy (a starting server is recovering it)") from None
                    time.sleep(0.02)
            yield
        finally:
            os.close(fd)

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def is_locked_by_other(self) -> bool:
        """True when a running `mta serve` holds the lock (used by the CLI)."""
        path = self.root / "lock"
        if not path.exists():
            return False
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(fd)
        return False

    # -- paths ---------------------------------------------------------------------------------

    def data_path(self, qid: str) -> Path:
        return self.msg / f"{qid}.eml"

    def meta_path(self, qid: str) -> Path:
        return self.msg / f"{qid}.json"

    # -- writing -------------------------------------------------------------------------------

    @staticmethod
    def _write_synced(path: Path, data: bytes) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if "file" not in _UNSAFE_SKIP_FSYNC:
                os.fsync(fd)
        finally:
            os.close(fd)

    def free_bytes(self) -> int:
        """Bytes an unprivileged writer may still use on the spool's file system."""
        st = os.statvfs(self.tmp)
        return st.f_bavail * st.f_frsize

    def _put_sync(self, meta: MessageMeta, data: bytes, reserve: int = 0) -> None:
        tmp_data = self.tmp / f"{meta.id}.eml"
        tmp_meta = self.tmp / f"{meta.id}.json"
        if reserve:
            try:
                left = self.free_bytes() - len(data) - _META_ALLOWANCE
            except OSError as exc:
                raise SpoolError(describe_os_error(exc)) from None
            if left < reserve:
                raise SpoolError("spool disk is full")
        try:
            self._write_synced(tmp_data, data)
            self._write_synced(tmp_meta, json.dumps(meta.to_json()).encode())
            os.rename(tmp_data, self.data_path(meta.id))
            os.rename(tmp_meta, self.meta_path(meta.id))
        except OSError as exc:
            for p in (tmp_data, tmp_meta, self.data_path(meta.id), self.meta_path(meta.id)):
                with contextlib.suppress(OSError):
                    p.unlink()
            raise SpoolError(describe_os_error(exc)) from None

    async def put(self, meta: MessageMeta, data: bytes, *, reserve: int = 0) -> None:
        """Store a new message; returns only when it is durable (then the caller may say 250).

        `reserve`: refuse (SpoolError "spool disk is full") unless that many bytes would stay free.
        """
        await asyncio.to_thread(self._put_durably, meta, data, reserve)

    def put_sync(self, meta: MessageMeta, data: bytes, *, reserve: int = 0) -> None:
        """`put`, blocking: for callers already in a worker thread (submission) or without a loop (sendmail)."""
        self._put_durably(meta, data, reserve)

    def _put_durably(self, meta: MessageMeta, data: bytes, reserve: int) -> None:
        """Write, rename and fsync the folder, all in one worker thread (one hop per message)."""
        self._put_sync(meta, data, reserve)
        try:
            self._dirsync.sync()
        except OSError as exc:
            self._discard(meta.id)
            raise SpoolError(describe_os_error(exc)) from None

    def _update_sync(self, meta: MessageMeta) -> None:
        tmp_meta = self.tmp / f"{meta.id}.json.new"
        try:
            self._write_synced(tmp_meta, json.dumps(meta.to_json()).encode())
            os.rename(tmp_meta, self.meta_path(meta.id))
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp_meta.unlink()
            raise SpoolError(describe_os_error(exc)) from None

    async def update(self, meta: MessageMeta) -> None:
        """Replace a message's state atomically (old or new, never torn)."""
        await asyncio.to_thread(self._update_durably, meta)

    def _update_durably(self, meta: MessageMeta) -> None:
        self._update_sync(meta)
        with contextlib.suppress(OSError):
            # A lost state change only means a retry of already-final work (at-least-once).
            self._dirsync.sync()

    def _discard(self, qid: str) -> None:
        for p in (self.meta_path(qid), self.data_path(qid)):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    async def remove(self, qid: str) -> None:
        """Forget a message whose recipients are all final (meta first: it is the commit point)."""
        await asyncio.to_thread(self._discard, qid)

    # -- reading -------------------------------------------------------------------------------

    def load_sync(self, qid: str) -> MessageMeta:
        try:
            raw = self.meta_path(qid).read_bytes()
        except FileNotFoundError:
            raise SpoolError(f"no such message {qid}") from None
        try:
            return MessageMeta.from_json(json.loads(raw))
        except (ValueError, CorruptEntry) as exc:
            raise CorruptEntry(f"{qid}: {exc}") from None

    async def load(self, qid: str) -> MessageMeta:
        return await asyncio.to_thread(self.load_sync, qid)

    def read_data_sync(self, qid: str) -> bytes:
        return self.data_path(qid).read_bytes()

    async def read_data(self, qid: str) -> bytes:
        return await asyncio.to_thread(self.read_data_sync, qid)

    def ids(self) -> list[str]:
        """Ids of every committed message (a meta file exists)."""
        try:
            return sorted(p.name[:-5] for p in os.scandir(self.msg) if p.name.endswith(".json"))
        except FileNotFoundError:
            if self.root.is_dir():
                return []  # a spool nothing was ever written to
            raise SpoolError(f"spool {self.root} does not exist") from None
        except OSError as exc:
            raise SpoolError(f"spool {self.root} is not readable: {_unusable(exc)}") from None

    def recover(self) -> Iterator[MessageMeta]:
        """Start-up scan: clean debris, quarantine corrupt metas, yield every message to resume."""
        for entry in os.scandir(self.tmp):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
        names = {e.name for e in os.scandir(self.msg)}
        for name in names:
            stem, _, ext = name.rpartition(".")
            if ext == "eml" and f"{stem}.json" not in names:
                log.warning("spool: removing data without envelope %s (never acknowledged)", stem)
                with contextlib.suppress(OSError):
                    os.unlink(self.msg / name)
            elif ext == "json" and f"{stem}.eml" not in names:
                log.warning("spool: removing envelope without data %s (never acknowledged)", stem)
                with contextlib.suppress(OSError):
                    os.unlink(self.msg / name)
        for name in sorted(names):
            if not name.endswith(".json") or name[:-5] + ".eml" not in names:
                continue
            qid = name[:-5]
            try:
                meta = self.load_sync(qid)
            except CorruptEntry as exc:
                # The data goes along: left alone, the next start would delete it as unacknowledged.
                log.error("spool: %s; moved to corrupt/ with its data", exc)
                for part in (name, f"{qid}.eml"):
                    with contextlib.suppress(OSError):
                        os.rename(self.msg / part, self.corrupt / part)
                # Flush the new names before any flush of msg/ can make the removal durable alone.
                with contextlib.suppress(OSError):
                    _fsync_dir(self.corrupt)
                continue
            except SpoolError:
                continue
            yield meta


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unusable(exc: OSError) -> str:
    """Why a spool folder cannot be used, in words an operator acts on."""
    if exc.errno in (errno.EEXIST, errno.ENOTDIR):
        return "not a directory (a file is in the way)"
    if exc.errno == errno.EROFS:
        return "read-only file system"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "disk is full"
    return str(exc.strerror or exc)


def describe_os_error(exc: OSError) -> str:
    """A spool write failure in words ("spool disk is full" decides 452 over 451 at submission)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "spool disk is full"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "spool is not writable"
    return f"spool write failed: {exc.strerror or exc}"


def make_meta(
    *, sender: str, recipients: list[str], data: bytes, now: float | None = None, client: str = "",
    kind: str = "mail", eight_bit: bool = False, smtputf8: bool = False,
) -> MessageMeta:
    """A fresh MessageMeta with every recipient queued and due now."""
    created = time.time() if now is None else now
    return MessageMeta(
        id=new_id(created),
        sender=sender,
        created=created,
        size=len(data),
        recipients=tuple(Recipient(address=r, next_attempt=created) for r in recipients),
        client=client,
        kind=kind,
        eight_bit=eight_bit,
        smtputf8=smtputf8,
    )
