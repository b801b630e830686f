"""The durable spool: one folder, one file per message, commit point = atomic rename.

Layout under `[queue] path`:
    msg/<id>.msg    "MTA-SPOOL-1 <data length>", newline, the envelope (MessageMeta as one line of
                    JSON with a schema number), newline, then the message bytes exactly as they will
                    be sent; written once, at submission
    msg/<id>.json   the envelope's later state (per-recipient progress), once it has changed; it
                    overrides the envelope line of <id>.msg
    msg/<id>.eml    (format of mta <= issue 18) the message bytes of a message whose envelope is
                    only in <id>.json; such spools keep loading, delivering and draining
    tmp/            files being written; anything here at start-up is debris and is removed
    corrupt/        messages whose envelope could not be parsed, every file of it (kept for the
                    operator, never retried)
    ctl/            requests from the CLI to a running server (see control.py)
    lock            flock()ed by the one `mta serve` that owns the spool

Failure model (what a crash or power cut at any moment leaves, cf. maddy's queue and Postfix):
- `put` from a submission child (group commit, journal.py): tmp file without a flush, a record in
  the child's journal segment, one fdatasync shared by every put of the batch, rename into msg/,
  then the 250. Until a checkpoint has flushed the message file, the journal is its durable copy.
- `put` anywhere else (sendmail, DSNs): one file in tmp/, fsync'ed, renamed into msg/, then msg/
  fsync'ed, coalesced across concurrent writers (GroupSync). A crash before the 250 leaves debris
  in tmp/ or a complete, unacknowledged message (delivered: at least once).
- `update`: the new state is written to tmp/, fsync'ed and renamed over <id>.json, so a reader
  sees the old or the new state, never a torn file. A lost update (power cut before the
  directory flush) only repeats an attempt whose outcome was lost: at least once, never lost.
- `remove`: no flush: a removal lost to a power cut brings back a finished message, delivered
  again (a duplicate, as with Postfix). The file holding the data goes first, then the state,
  so a crash in between leaves a state without data, which start-up removes; for the old format
  the state goes first (it is the commit point), then the data.
- A full disk (ENOSPC) makes `put` and `update` raise SpoolError("spool disk is full") and leaves
  no debris: a refused `put` stores nothing, a failed `update` leaves the previous state file.
  Submissions (`put(..., reserve=SUBMISSION_RESERVE)`) are refused while less than the reserve
  would remain, so state updates and DSNs of mail already accepted still fit when clients are
  what fills the disk (cf. Postfix's queue_minfree).

All blocking calls run in worker threads (runtime.offload on the mail path, asyncio.to_thread
elsewhere) so the event loop never waits on the disk; the exception is a fresh message's read
(`fresh`), which is in the page cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from mta import runtime
from mta.errors import CorruptEntry, SpoolError
from mta.spool import loopput
from mta.spool.files import describe_os_error, flock_within, fsync_dir, read_noatime, unusable
from mta.spool.ids import id_created, make_meta, new_id  # noqa: F401 (re-exported: the spool's API)
from mta.spool.journal import GroupSync, JournalBook, JournalWriter
from mta.spool.state import MessageMeta

log = logging.getLogger("mta.spool")

# Bytes a submission must leave free: room for a few hundred state rewrites and DSNs.
SUBMISSION_RESERVE = 1 << 20
# What one message costs besides its data: the meta file, rounded up to common block sizes.
_META_ALLOWANCE = 8192
# First line of a <id>.msg file: format name and the data's length (recovery checks it is whole).
_MAIL_MAGIC = b"MTA-SPOOL-1"
# Test hook only (issue 17): MTA_UNSAFE_SKIP_FSYNC=dir and/or file (comma-separated) skips that
# flush, so the power-cut test (tests/e2e/test_powercut.py) can prove it sees the loss. Unset in
# production: with it, acknowledged mail does not survive a power cut.
_UNSAFE_SKIP_FSYNC = frozenset(os.environ.get("MTA_UNSAFE_SKIP_FSYNC", "").split(",")) - {""}


class SpoolStore:
    """Owns the spool folder: put, load, update and remove messages durably."""

    def __init__(self, path: str | Path) -> None:
        self.root = Path(path)
        self.msg = self.root / "msg"
        self.tmp = self.root / "tmp"
        self.corrupt = self.root / "corrupt"
        self.ctl = self.root / "ctl"
        self.journal_dir = self.root / "journal"
        self._lock_fd: int | None = None
        self._dirsync = GroupSync(self._flush_msg_dir)
        # Group commit (journal.py): the submission child opens a writer; the owner keeps the book.
        self.journal: JournalWriter | None = None
        self.segment_of: dict[str, str] = {}
        self.book = JournalBook(self.journal_dir, self.mail_path, self.msg, fsync_dir,
                                skip_dir="dir" in _UNSAFE_SKIP_FSYNC, skip_file="file" in _UNSAFE_SKIP_FSYNC)

    def _flush_msg_dir(self) -> None:
        if "dir" not in _UNSAFE_SKIP_FSYNC:
            fsync_dir(self.msg)

    def open_journal(self, writer: str) -> None:
        """Submissions from this process go through the group-commit journal (journal.py)."""
        self.journal = JournalWriter(self.journal_dir, writer, skip_file="file" in _UNSAFE_SKIP_FSYNC,
                                     skip_dir="dir" in _UNSAFE_SKIP_FSYNC, fsync_dir=fsync_dir)

    # -- setup ---------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Create the folders; raise SpoolError with a clear reason if that is impossible."""
        try:
            created = False
            for d in (self.root, self.msg, self.tmp, self.corrupt, self.ctl, self.journal_dir):
                if not d.is_dir():
                    d.mkdir(parents=True, exist_ok=True)
                    created = True
            if created:
                # A new folder's name is durable only once its parent is flushed: without this a
                # power cut soon after the first start takes the whole spool, acknowledged mail and
                # all (found by tests/e2e/test_powercut.py).
                for d in (*reversed(self.root.resolve().parents), self.root):
                    with contextlib.suppress(OSError):
                        fsync_dir(d)
            probe = self.tmp / f".probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise SpoolError(f"spool {self.root} is not writable: {unusable(exc)}") from None

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
            flock_within(fd, fcntl.LOCK_EX, timeout,
                          f"spool {self.root}: an old submission process is still running")
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
            flock_within(fd, fcntl.LOCK_SH, timeout, f"spool {self.root}: busy (a starting server is recovering it)")
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

    def _tmp_mail(self, qid: str) -> Path:
        """Where a <id>.msg is written before its rename into msg/ (debris after a crash)."""
        return self.tmp / f"{qid}.msg"

    def mail_path(self, qid: str) -> Path:
        """Envelope line + data, written once at submission (the current format)."""
        return self.msg / f"{qid}.msg"

    def data_path(self, qid: str) -> Path:
        """Data of an old-format message (envelope only in meta_path)."""
        return self.msg / f"{qid}.eml"

    def meta_path(self, qid: str) -> Path:
        """The latest state, once it changed after submission (always, in the old format)."""
        return self.msg / f"{qid}.json"

    def exists(self, qid: str) -> bool:
        """True when `qid` is a message in the spool (either format)."""
        return self.mail_path(qid).exists() or self.meta_path(qid).exists()

    # -- writing -------------------------------------------------------------------------------

    @staticmethod
    def _write_synced(path: Path, data: bytes, flush: bool = True) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if flush and "file" not in _UNSAFE_SKIP_FSYNC:
                os.fsync(fd)
        finally:
            os.close(fd)

    def free_bytes(self) -> int:
        """Bytes an unprivileged writer may still use on the spool's file system."""
        st = os.statvfs(self.tmp)
        return st.f_bavail * st.f_frsize

    def _put_sync(self, meta: MessageMeta, data: bytes, reserve: int = 0, *, envelope: bytes | None = None,
                  flush: bool = True, publish: bool = True) -> None:
        tmp_mail = self._tmp_mail(meta.id)
        if reserve:
            try:
                left = self.free_bytes() - len(data) - _META_ALLOWANCE
            except OSError as exc:
                raise SpoolError(describe_os_error(exc)) from None
            if left < reserve:
                raise SpoolError("spool disk is full")
        try:
            # json.dumps escapes every newline inside strings: the first b"\n" ends the envelope.
            if envelope is None:
                envelope = json.dumps(meta.to_json()).encode()
            self._write_synced(tmp_mail, mail_file(envelope, data), flush)
            if publish:
                os.rename(tmp_mail, self.mail_path(meta.id))
        except OSError as exc:
            for p in (tmp_mail, self.mail_path(meta.id)):
                with contextlib.suppress(OSError):
                    p.unlink()
            raise SpoolError(describe_os_error(exc)) from None

    async def put(self, meta: MessageMeta, data: bytes, *, reserve: int = 0) -> None:
        """Store a new message; returns only when it is durable (then the caller may say 250).

        `reserve`: refuse (SpoolError "spool disk is full") unless that many bytes would stay free.
        """
        await runtime.offload(self._put_durably, meta, data, reserve)

    async def put_on_loop(self, meta: MessageMeta, data: bytes, *, reserve: int = 0) -> None:
        """`put` for the submission child: the page-cache writes on the loop, the group flush in a
        thread, one hop per batch (loopput.py). Without a journal, `put`."""
        if self.journal is None:
            return await self.put(meta, data, reserve=reserve)
        self.segment_of[meta.id] = await loopput.put_journaled(self, self.journal, meta, data, reserve)

    def put_sync(self, meta: MessageMeta, data: bytes, *, reserve: int = 0) -> None:
        """`put`, blocking: for callers already in a worker thread or without a loop (sendmail,
        a listener in the server's own process). Always the file-per-message path: the journal's
        only writer is the submission child, whose puts go through `put_on_loop`."""
        self._put_durably(meta, data, reserve)

    def _stage(self, meta: MessageMeta, data: bytes, reserve: int) -> bytes:
        """A journaled put's tmp file (no flush; loopput.py); returns the envelope for its record."""
        envelope = json.dumps(meta.to_json()).encode()
        self._put_sync(meta, data, reserve, envelope=envelope, flush=False, publish=False)
        return envelope

    def _refused(self, qid: str, exc: OSError, journal: JournalWriter | None = None, segment: str = "") -> SpoolError:
        """A journaled put that failed: its tmp file goes, and its record (if written) is marked
        never to be replayed (the client is told 4xx)."""
        if journal is not None:
            journal.cancel(segment, qid)
        self._drop_tmp(qid)
        return SpoolError(describe_os_error(exc))

    def _drop_tmp(self, qid: str) -> None:
        with contextlib.suppress(OSError):
            self._tmp_mail(qid).unlink()

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
        self.book.restate(meta.id)  # before the file exists: a read never misses it (see _only_msg)
        try:
            self._write_synced(tmp_meta, json.dumps(meta.to_json()).encode())
            os.rename(tmp_meta, self.meta_path(meta.id))
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp_meta.unlink()
            raise SpoolError(describe_os_error(exc)) from None

    async def update(self, meta: MessageMeta) -> None:
        """Replace a message's state atomically (old or new, never torn)."""
        await runtime.offload(self._update_durably, meta)

    def _update_durably(self, meta: MessageMeta) -> None:
        self._update_sync(meta)
        with contextlib.suppress(OSError):
            # A lost state change only means a retry of already-final work (at-least-once).
            self._dirsync.sync()

    def _discard(self, qid: str) -> None:
        # Data before state (current format), state before data (old format): whatever a crash in
        # between leaves is a state without data or data without state, both removed at start-up.
        self._unlink_all(qid)
        self.book.done(qid)  # after the files: a replay must not bring a finished message back

    def _unlink_all(self, qid: str) -> None:
        if self._only_msg(qid):
            self.mail_path(qid).unlink(missing_ok=True)
            return
        for p in (self.mail_path(qid), self.meta_path(qid), self.data_path(qid)):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    def replay_journal(self) -> int:
        """Start-up, before any writer: restore from the journal what a crash left unflushed."""
        def whole(qid: str) -> bool:
            try:
                self.check_whole(qid)
            except CorruptEntry:
                return False
            return self.mail_path(qid).exists()

        def restore(qid: str, envelope: bytes, data: bytes) -> None:
            tmp = self._tmp_mail(qid)
            self._write_synced(tmp, mail_file(envelope, data))
            os.rename(tmp, self.mail_path(qid))

        restored = self.book.replay(whole, restore, self._unlink_all)
        if restored:
            log.warning("spool: restored %d message file(s) from the journal", restored)
        return restored

    async def remove(self, qid: str) -> None:
        """Forget a message whose recipients are all final (meta first: it is the commit point)."""
        await runtime.offload(self._discard, qid)

    # -- reading -------------------------------------------------------------------------------

    def state_bytes(self, qid: str) -> bytes:
        """The raw envelope: the latest <id>.json, else the first line of <id>.msg (with its newline)."""
        try:
            return self.meta_path(qid).read_bytes()
        except FileNotFoundError:
            pass
        try:
            with open(self.mail_path(qid), "rb") as f:
                f.readline()  # the length line
                return f.readline()
        except FileNotFoundError:
            raise SpoolError(f"no such message {qid}") from None

    def load_sync(self, qid: str) -> MessageMeta:
        return self._parse(qid, self.state_bytes(qid))

    @staticmethod
    def _parse(qid: str, raw: bytes) -> MessageMeta:
        try:
            meta = MessageMeta.from_json(json.loads(raw))
        except (ValueError, CorruptEntry) as exc:
            raise CorruptEntry(f"{qid}: {exc}") from None
        return meta

    def load_with_data_sync(self, qid: str) -> tuple[MessageMeta, bytes]:
        """Envelope and data with one open of <id>.msg (the delivery hot path needs both)."""
        raw = b""
        if not self._only_msg(qid):
            with contextlib.suppress(FileNotFoundError):
                raw = self.meta_path(qid).read_bytes()  # an update's newer envelope
        try:
            whole = read_noatime(self.mail_path(qid))
        except FileNotFoundError:  # the old two-file format, or gone (load_sync says which)
            meta = self.load_sync(qid)
            return meta, b"" if meta.held or meta.done else self.data_path(qid).read_bytes()
        _, _, rest = whole.partition(b"\n")  # the length line
        line, _, data = rest.partition(b"\n")
        return self._parse(qid, raw or line), data

    def _only_msg(self, qid: str) -> bool:
        """Certainly no file but <id>.msg: fresh, and never updated by this process (the only
        writer of a .json while it holds the spool), so the hot path looks for no other file:
        lookups in a busy msg/ folder wait on its blocks while the spool's flushes commit them."""
        return self.book.only_msg(qid)

    def fresh(self, qid: str) -> bool:
        """Written by a submission child seconds ago (its journal segment is not checkpointed):
        its file is in the page cache, so reading it costs less than a thread hop (issue 18)."""
        return self.book.holds(qid)

    def check_whole(self, qid: str) -> None:
        """CorruptEntry unless <id>.msg (if that is the format) holds its length line, the envelope
        and as many data bytes as the length line says: a file renamed into place before its flush
        could be torn by a power cut (only with the MTA_UNSAFE_SKIP_FSYNC test hook, or a disk that
        lies about its flushes)."""
        try:
            with open(self.mail_path(qid), "rb") as f:
                head, line = f.readline(), f.readline()
                size = os.fstat(f.fileno()).st_size
        except FileNotFoundError:
            return
        magic, _, length = head.partition(b" ")
        want = len(head) + len(line) + int(length) if magic == _MAIL_MAGIC and length.strip().isdigit() else -1
        if not line.endswith(b"\n") or size != want:
            raise CorruptEntry(f"{qid}: {qid}.msg is torn or not a spool file ({size} bytes)")

    async def load(self, qid: str) -> MessageMeta:
        return await asyncio.to_thread(self.load_sync, qid)

    def read_data_sync(self, qid: str) -> bytes:
        try:
            with open(self.mail_path(qid), "rb") as f:
                f.readline()
                f.readline()
                return f.read()
        except FileNotFoundError:
            return self.data_path(qid).read_bytes()

    async def read_data(self, qid: str) -> bytes:
        return await asyncio.to_thread(self.read_data_sync, qid)

    def ids(self) -> list[str]:
        """Ids of every committed message (a .msg file, or an old-format .json)."""
        try:
            return sorted({p.name.rpartition(".")[0] for p in os.scandir(self.msg)
                           if p.name.endswith((".msg", ".json"))})
        except FileNotFoundError:
            if self.root.is_dir():
                return []  # a spool nothing was ever written to
            raise SpoolError(f"spool {self.root} does not exist") from None
        except OSError as exc:
            raise SpoolError(f"spool {self.root} is not readable: {unusable(exc)}") from None

    def recover(self) -> Iterator[MessageMeta]:
        """Start-up scan: clean debris, quarantine corrupt entries, yield every message to resume."""
        from mta.spool.recovery import recover

        self.replay_journal()  # first: it restores files the scan would otherwise call torn
        return recover(self)


def mail_file(envelope: bytes, data: bytes) -> bytes:
    """A <id>.msg file's bytes: length line, envelope line (json.dumps escapes newlines), data."""
    return b"%s %d\n" % (_MAIL_MAGIC, len(data)) + envelope + b"\n" + data
