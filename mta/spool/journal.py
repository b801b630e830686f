"""Group commit for submissions: an append-only journal, one fdatasync per batch (issue 18 target 1).

Why: a file per message costs one flush for its data plus a share of one for its folder, about
one disk flush per message whatever the batching. Here a submission child appends each message to
its own journal segment, and one fdatasync of the segment covers every message appended before it
(group commit, as a database's write-ahead log does). The 250 is sent only after that fdatasync.
The message's spool file `msg/<id>.msg` is still written (delivery reads it) but not flushed:
while its segment exists the journal is the durable copy.

Layout under `<spool>/journal/`:
    <writer>.log      a segment being appended to by the submission child named in it
    <writer>.sealed   a finished segment (renamed by its writer once nothing is in flight)
    <writer>.done     queue ids of the segment's messages that are finished (delivered, bounced,
                      deleted) or whose write was refused: appended without a flush

Record: b"MTAJ", then big-endian lengths of envelope and data, CRC-32 of both, envelope (the
MessageMeta JSON), data. A segment is read up to its first incomplete or damaged record: every
record that was acknowledged lies before it (its fdatasync covered everything written earlier).

Order of a put (loopput.put_journaled): data and envelope to tmp/<id>.msg (no flush), the record to
the segment, the group fdatasync, the rename into msg/, then the 250. A power cut before the
fdatasync leaves at most debris in tmp/; after it the journal restores whatever the file lacks.

Checkpoint (the spool owner, JournalBook.checkpoint_due): for a sealed segment, fsync every message
file of it that still exists, fsync msg/ (that also makes the removals of finished messages
durable), then delete the segment and fsync journal/. After that the segment is not needed.

Replay (start-up, before any writer runs): for every segment, each record whose id is not in the
.done file and whose msg/<id>.msg is missing or torn is written back (fsync'ed); files of ids in
.done are removed (their removal was lost); then the segment goes as in a checkpoint.

Durability bookkeeping is in flushes, not in process memory: a SIGKILL at any moment loses
nothing, since the page cache keeps what was written; a power cut loses at most what a flush did
not cover, which was never acknowledged (the power-cut tests and the crash soak judge this).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

from mta.spool.loopput import LoopFlush

SEGMENT_MAGIC = b"MTA-JOURNAL-1\n"
RECORD_MAGIC = b"MTAJ"
_HEAD = struct.Struct(">4sIII")
# A segment is this big (written as zeros first; a bigger message gets a segment its size). It is
# sealed when full, or SEAL_AGE seconds after it was opened once nothing is in flight; the owner
# checkpoints it CHECKPOINT_AGE seconds later, when most of its mail is delivered (a checkpoint
# flushes every message file of the segment still in the spool, one flush each).
SEGMENT_BYTES = 4 << 20
SEAL_AGE = 10.0
CHECKPOINT_AGE = 3.0


def encode(envelope: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(data, zlib.crc32(envelope))
    return _HEAD.pack(RECORD_MAGIC, len(envelope), len(data), crc) + envelope + data


def decode(buf: bytes) -> Iterator[tuple[bytes, bytes]]:
    """(envelope, data) of every whole record of a segment's bytes, up to the first damaged one."""
    if not buf.startswith(SEGMENT_MAGIC):
        return
    pos = len(SEGMENT_MAGIC)
    while pos + _HEAD.size <= len(buf):
        magic, elen, dlen, crc = _HEAD.unpack_from(buf, pos)
        start = pos + _HEAD.size
        end = start + elen + dlen
        if magic != RECORD_MAGIC or end > len(buf):
            return
        envelope, data = buf[start:start + elen], buf[start + elen:end]
        if zlib.crc32(data, zlib.crc32(envelope)) != crc:
            return
        yield envelope, data
        pos = end


def record_id(envelope: bytes) -> str | None:
    """The queue id inside a record's envelope; None if it does not parse (never written so)."""
    try:
        qid = json.loads(envelope).get("id")
    except (ValueError, AttributeError):
        return None
    return qid if isinstance(qid, str) and qid.isalnum() else None


class GroupSync:
    """Coalesces one flush operation across concurrent writer threads (group commit).

    A caller returns only after a flush that STARTED after its call has finished: a flush already
    running may have begun before the caller's writes, so the caller waits for the next one, which
    one of the waiting threads runs for all of them.
    """

    def __init__(self, flush: Callable[[], None]) -> None:
        self._flush = flush
        self._cv = threading.Condition()
        self._requested = 0
        self._completed = 0
        self._running = False

    def sync(self) -> None:
        """Return once a flush that started after this call has finished; raise its OSError."""
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
                    self._flush()
                except OSError as exc:
                    error = exc
                finally:
                    self._cv.acquire()
                    self._running = False
                    self._cv.notify_all()
                if error is not None:
                    raise error
                self._completed = max(self._completed, covers)


class _Segment:
    """One segment file, written in full (zeros) when created and then overwritten record by
    record: the group fdatasync then changes neither the file's size nor its block map, so ext4
    needs no journal commit for it: one device flush per batch instead of two or three."""

    def __init__(self, folder: Path, name: str, capacity: int, skip_flush: bool) -> None:
        self.name = name
        self.path = folder / f"{name}.log"
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        # Held until the segment is sealed: replay and checkpoint_all leave a live writer's segment alone.
        fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.capacity = capacity
        self.size = 0
        self.count = 0
        self.inflight = 0
        self.opened = time.monotonic()
        self.sealing = False
        self.sync = LoopFlush(self._flush)  # the writer's put awaits it (loopput.py)
        self._skip = skip_flush

    def preallocate(self) -> None:
        zeros = bytes(min(self.capacity, 1 << 20))
        done = 0
        while done < self.capacity:
            done += os.pwrite(self.fd, zeros[: self.capacity - done], done)
        self.append(SEGMENT_MAGIC)

    def _flush(self) -> None:
        if not self._skip:
            os.fdatasync(self.fd)

    def fits(self, size: int) -> bool:
        return self.size + size <= self.capacity

    def append(self, blob: bytes) -> None:
        view = memoryview(blob)
        while view:
            written = os.pwrite(self.fd, view, self.size)
            view = view[written:]
            self.size += written


class JournalWriter:
    """A submission child's side: `append` a record, await its segment's `sync` (the shared
    fdatasync), then `release` it (loopput.put_journaled)."""

    def __init__(self, folder: Path, writer: str, *, skip_file: bool = False, skip_dir: bool = False,
                 fsync_dir: Callable[[Path], None]) -> None:
        self.folder = folder
        self._writer = writer
        self._skip_file = skip_file
        self._skip_dir = skip_dir
        self._fsync_dir = fsync_dir
        self._lock = threading.Lock()
        self._current: _Segment | None = None
        self._serial = 0

    def _open(self, need: int) -> _Segment:
        self._serial += 1
        need += len(SEGMENT_MAGIC)
        st = os.statvfs(self.folder)
        # At most an eighth of the free space: a small or nearly full spool disk gets small segments.
        capacity = max(need, min(SEGMENT_BYTES, st.f_bavail * st.f_frsize // 8))
        seg = _Segment(self.folder, f"{self._writer}-{self._serial}", capacity, self._skip_file)
        try:
            seg.preallocate()
            if not self._skip_file:
                os.fsync(seg.fd)  # size and blocks: later fdatasyncs then only write data
            if not self._skip_dir:
                self._fsync_dir(self.folder)  # the segment's name must survive before it holds mail
        except OSError:
            os.close(seg.fd)
            with contextlib.suppress(OSError):
                seg.path.unlink()
            raise
        return seg

    def append(self, envelope: bytes, data: bytes) -> _Segment:
        """Append one record (no flush yet); the caller then calls commit(segment)."""
        blob = encode(envelope, data)
        with self._lock:
            seg = self._current
            if seg is None or not seg.fits(len(blob)):
                if seg is not None:
                    self._seal_locked(seg)
                seg = self._current = self._open(len(blob))
            seg.append(blob)
            seg.count += 1
            seg.inflight += 1
            return seg

    def fits(self, envelope: bytes, data: bytes) -> bool:  # append would open no new segment
        return self._current is not None and self._current.fits(_HEAD.size + len(envelope) + len(data))

    def release(self, seg: _Segment) -> None:
        """A record's flush is over (done or failed): a sealed segment closes after its last."""
        with self._lock:
            seg.inflight -= 1
            if seg.sealing and seg.inflight == 0:
                self._close_sealed(seg)

    def cancel(self, segment: str, qid: str) -> None:
        """A record whose put failed: never to be replayed (the client was told 4xx)."""
        with contextlib.suppress(OSError), open(self.folder / f"{segment}.done", "ab") as f:
            f.write(f"{qid}\n".encode())

    def tick(self, now: float | None = None) -> None:
        """Seal the segment once it is SEAL_AGE old and idle, so the owner can checkpoint it."""
        now = time.monotonic() if now is None else now
        with self._lock:
            seg = self._current
            if seg is not None and seg.count and seg.inflight == 0 and now - seg.opened >= SEAL_AGE:
                self._seal_locked(seg)

    def close(self) -> None:
        with self._lock:
            if self._current is not None:
                self._seal_locked(self._current)

    def _seal_locked(self, seg: _Segment) -> None:
        self._current = None if self._current is seg else self._current
        seg.sealing = True
        if seg.inflight == 0:
            self._close_sealed(seg)

    def _close_sealed(self, seg: _Segment) -> None:
        # Renamed while still locked, then closed. No flush: a rename lost to a power cut leaves a
        # .log, which replay treats the same.
        with contextlib.suppress(OSError):
            os.rename(seg.path, seg.path.with_suffix(".sealed"))
        os.close(seg.fd)
        seg.fd = -1


def segments(folder: Path, *suffixes: str) -> list[Path]:
    """Segments with these suffixes, except a .log a live writer still holds (flock)."""
    try:
        found = sorted(p for p in folder.iterdir() if p.suffix in suffixes)
    except FileNotFoundError:
        return []
    return [p for p in found if p.suffix != ".log" or not _held(p)]


def _held(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return True  # sealed or checkpointed meanwhile: not ours to touch under this name
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # closing drops our lock too
    return False


def read_done(folder: Path, name: str) -> set[str]:
    try:
        raw = (folder / f"{name}.done").read_bytes()
    except FileNotFoundError:
        return set()
    return {line.decode("ascii", "replace") for line in raw.split(b"\n") if line.isalnum()}


class JournalBook:
    """The spool owner's side: which segment holds a message (for its .done mark), checkpoints."""

    def __init__(self, folder: Path, msg_path: Callable[[str], Path], msg_folder: Path,
                 fsync_dir: Callable[[Path], None], *, skip_dir: bool = False, skip_file: bool = False) -> None:
        self.folder = folder
        self._msg_path = msg_path
        self._msg_folder = msg_folder
        self._fsync_dir = fsync_dir
        self._skip_dir = skip_dir
        self._skip_file = skip_file
        # `_lock` guards the tables and is never held across I/O (`note` runs on the event loop);
        # `_io` guards the .done fds while they are written, flushed or closed. Both: `_io` first.
        self._lock = threading.Lock()
        self._io = threading.Lock()
        self._segment_of: dict[str, str] = {}
        self._members: dict[str, set[str]] = {}
        self._restated: set[str] = set()  # held messages given an <id>.json since (see only_msg)
        self._retired: dict[str, None] = {}  # recent checkpointed segments (bounded): late notes ignored
        self._marks: dict[str, int] = {}  # open .done files, by segment
        self._dirty: set[str] = set()
        self._new_marks = False  # a .done file created since journal/ was last flushed
        self._unlinked = False  # a message removed since msg/ was last flushed by flush_marks

    def note(self, qid: str, segment: str) -> None:
        """A message acknowledged out of `segment` (a line from the submission child)."""
        if not segment or not segment.replace("-", "").isalnum():
            return
        with self._lock:
            if segment in self._retired:
                return
            self._segment_of[qid] = segment
            self._members.setdefault(segment, set()).add(qid)

    def holds(self, qid: str) -> bool:
        """`qid` came through a segment that is not checkpointed yet: written seconds ago."""
        return qid in self._segment_of  # one dict lookup: atomic under the GIL, no lock needed

    def restate(self, qid: str) -> None:
        """`qid` is about to get an <id>.json (an update): its <id>.msg is no longer all of it."""
        with self._lock:
            if qid in self._segment_of:
                self._restated.add(qid)

    def only_msg(self, qid: str) -> bool:
        """Held and never restated: <id>.msg is the message's one file (the spool's hot path then
        looks for no other). Forgotten with the rest of the message at `done` or checkpoint."""
        with self._lock:
            return qid in self._segment_of and qid not in self._restated

    def done(self, qid: str) -> None:
        """The message's files are gone: mark it so a replay does not bring it back."""
        with self._lock:
            self._unlinked = True
            self._restated.discard(qid)
            segment = self._segment_of.pop(qid, None)
            if segment is None:
                return
            self._members.get(segment, set()).discard(qid)
        # Flushed by flush_marks a moment later, not now: a mark lost to a power cut means at most a
        # second delivery of a message finished in that moment.
        created = False
        with self._io, contextlib.suppress(OSError):
            if segment in self._retired:
                return  # checkpointed meanwhile: nothing will replay it
            fd = self._marks.get(segment)
            if fd is None:
                fd = self._marks[segment] = os.open(self.folder / f"{segment}.done",
                                                    os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                created = True
            os.write(fd, f"{qid}\n".encode())
        with self._lock:  # after the write: a flush that sees the segment dirty covers the write
            self._dirty.add(segment)
            self._new_marks = self._new_marks or created

    def flush_marks(self) -> int:
        """Make the removals of the last moments durable: fdatasync the .done files written since the
        last call and flush msg/ (a removal not journaled here, of a message resumed at start-up,
        say, is durable only by that). The owner calls this a few times a second: one or two flushes
        per interval however many messages finished in it. Returns how many .done files it flushed.

        Only `_io` is held while flushing, never `_lock`: `note` runs on the event loop."""
        with self._lock:
            dirty = list(self._dirty)
            self._dirty.clear()
            new, self._new_marks = self._new_marks, False
            unlinked, self._unlinked = self._unlinked, False
        with self._io, contextlib.suppress(OSError):
            if unlinked and not self._skip_dir:
                self._fsync_dir(self._msg_folder)
            if not self._skip_file:
                for segment in dirty:
                    fd = self._marks.get(segment)
                    if fd is not None:  # None: checkpointed meanwhile
                        os.fdatasync(fd)
            if new and not self._skip_dir:
                self._fsync_dir(self.folder)
        return len(dirty)

    def tracked(self) -> int:
        with self._lock:
            return len(self._segment_of)

    def checkpoint_due(self, now: float | None = None) -> int:
        """Checkpoint every segment sealed at least CHECKPOINT_AGE seconds ago; returns how many."""
        now = time.time() if now is None else now
        due = []
        for path in segments(self.folder, ".sealed"):
            with contextlib.suppress(FileNotFoundError):
                if now - path.stat().st_mtime >= CHECKPOINT_AGE:
                    due.append(path)
        return self._checkpoint(due)

    def checkpoint_all(self) -> int:
        """Every segment, open ones too: only when no writer is left (shutdown; start-up replays)."""
        return self._checkpoint(segments(self.folder, ".sealed", ".log"))

    def _checkpoint(self, paths: list[Path]) -> int:
        if not paths:
            return 0
        for path in paths:
            for envelope, _ in decode(path.read_bytes()):
                qid = record_id(envelope)
                if qid is not None:
                    self._flush_file(self._msg_path(qid))
        self._finish(paths)
        return len(paths)

    def _flush_file(self, path: Path) -> None:
        if self._skip_file:
            return
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return  # finished meanwhile: its removal is made durable by the folder flush below
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _finish(self, paths: list[Path]) -> None:
        """Flush msg/, then drop the segments (durably) and forget their members."""
        if not self._skip_dir:
            self._fsync_dir(self._msg_folder)
        names = [p.stem for p in paths]
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        if not self._skip_dir:
            # A segment whose removal is lost would replay as if its finished mail were new.
            self._fsync_dir(self.folder)
        with self._io:
            for name in names:
                fd = self._marks.pop(name, None)
                if fd is not None:
                    os.close(fd)
                with contextlib.suppress(FileNotFoundError):
                    (self.folder / f"{name}.done").unlink()
            with self._lock:  # `_io` first, always; only table updates under `_lock`
                for name in names:
                    self._retired[name] = None
                    self._dirty.discard(name)
                    for qid in self._members.pop(name, set()):
                        self._segment_of.pop(qid, None)
                        self._restated.discard(qid)
                while len(self._retired) > 1024:
                    del self._retired[next(iter(self._retired))]

    def replay(self, whole: Callable[[str], bool], restore: Callable[[str, bytes, bytes], None],
               discard: Callable[[str], None]) -> int:
        """Start-up, before any writer: make every unfinished message of every segment durable in
        msg/ (restoring missing or torn files from the journal), then drop the segments. Returns how
        many files were restored."""
        paths = segments(self.folder, ".sealed", ".log")
        restored = 0
        for path in paths:
            finished = read_done(self.folder, path.stem)
            for envelope, data in decode(path.read_bytes()):
                qid = record_id(envelope)
                if qid is None:
                    continue
                if qid in finished:
                    discard(qid)  # a removal the crash undid: the message was finished
                elif whole(qid):
                    self._flush_file(self._msg_path(qid))
                else:
                    restore(qid, envelope, data)
                    restored += 1
        if paths:
            self._finish(paths)
        # .done files whose segment is gone (checkpointed before the crash) mean nothing now.
        for path in segments(self.folder, ".done"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        return restored
