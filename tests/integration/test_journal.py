"""The group-commit journal (mta/spool/journal.py, issue 18 target 1) on a real file system.

PWR-4: a submission through the journal is durable after ONE shared fdatasync, crash leftovers
are restored from the journal at start-up, finished messages are not brought back, a live
writer's segment is never touched, and a refused put leaves nothing to replay.
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading
import time
from pathlib import Path

import pytest

from mta.errors import SpoolError
from mta.spool import journal
from mta.spool.state import MessageMeta
from mta.spool.store import SpoolStore, make_meta

pytestmark = pytest.mark.req("PWR-4")


def _put(store: SpoolStore, n: int, prefix: str = "m") -> list[str]:
    """n journaled puts, one after another, as the submission child makes them (on its loop)."""
    ids = []
    for i in range(n):
        data = f"Subject: {prefix}{i}\r\n\r\nbody {i}\r\n".encode()
        meta = make_meta(sender="a@src.test", recipients=[f"r{i}@dst.test"], data=data)
        asyncio.run(store.put_on_loop(meta, data))
        ids.append(meta.id)
    return ids


def test_records_round_trip_and_reading_stops_at_the_first_damage() -> None:
    recs = [(b'{"id": "A1"}', b"one"), (b'{"id": "B2"}', b"two" * 100), (b'{"id": "C3"}', b"")]
    buf = journal.SEGMENT_MAGIC + b"".join(journal.encode(e, d) for e, d in recs)
    assert list(journal.decode(buf)) == recs
    assert list(journal.decode(buf + bytes(4096))) == recs  # the zeros of a preallocated segment
    assert list(journal.decode(buf[:-1])) == recs[:2]  # one byte short: the last record is not whole
    torn = buf[: len(buf) - len(journal.encode(*recs[2])) - 5]
    assert list(journal.decode(torn)) == recs[:1]
    flipped = bytearray(buf)
    flipped[len(journal.SEGMENT_MAGIC) + journal._HEAD.size + 3] ^= 1  # inside the first envelope
    assert list(journal.decode(bytes(flipped))) == []
    assert list(journal.decode(b"not a segment" + buf)) == []
    assert journal.record_id(b'{"id": "0A1B"}') == "0A1B"
    for bad in (b"[]", b"{", b'{"id": "../x"}', b'{"id": 5}'):
        assert journal.record_id(bad) is None


def test_group_sync_every_caller_is_covered_by_a_flush_that_started_after_it() -> None:
    flushes: list[tuple[float, float]] = []

    def flush() -> None:
        start = time.monotonic()
        time.sleep(0.01)
        flushes.append((start, time.monotonic()))

    group = journal.GroupSync(flush)
    calls: list[tuple[float, float]] = []
    lock = threading.Lock()

    def caller() -> None:
        for _ in range(5):
            t = time.monotonic()
            group.sync()
            with lock:
                calls.append((t, time.monotonic()))

    threads = [threading.Thread(target=caller) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(calls) == 40
    assert len(flushes) < 40  # batched
    for called, returned in calls:
        assert any(start >= called and end <= returned for start, end in flushes)


def test_a_batch_of_concurrent_puts_shares_fdatasyncs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """80 concurrent puts, as 80 tasks on the submission child's loop."""
    store = SpoolStore(tmp_path / "q")
    store.prepare()
    store.open_journal("t1")
    syncs = []
    real = os.fdatasync

    def slow_fdatasync(fd: int) -> None:
        syncs.append(fd)
        time.sleep(0.005)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", slow_fdatasync)
    messages = [_message(i) for i in range(80)]

    async def main() -> None:
        await asyncio.gather(*(store.put_on_loop(meta, data) for meta, data in messages))

    asyncio.run(main())
    ids = [meta.id for meta, _ in messages]
    assert all(store.load_with_data_sync(meta.id)[1] == data for meta, data in messages)
    assert len(ids) == 80
    assert len(syncs) < 40, f"{len(syncs)} fdatasyncs for 80 puts"
    assert all(store.mail_path(q).exists() for q in ids)
    assert list(store.tmp.iterdir()) == []
    (seg,) = store.journal_dir.glob("*.log")  # held by its writer: journal.segments() skips it
    assert {journal.record_id(e) for e, _ in journal.decode(seg.read_bytes())} == set(ids)
    assert seg.stat().st_size == journal.SEGMENT_BYTES  # preallocated: the fdatasyncs change no size
    assert {store.segment_of[q] for q in ids} == {seg.stem}


def _message(i: int) -> tuple[MessageMeta, bytes]:
    data = f"Subject: m{i}\r\n\r\nbody {i}\r\n".encode() + b"x" * 2000
    return make_meta(sender="a@src.test", recipients=[f"r{i}@dst.test"], data=data), data


def _crash_leftovers(tmp_path: Path) -> tuple[SpoolStore, list[str]]:
    """Five journaled puts in a 'child' whose segment then stays behind as after a SIGKILL."""
    store = SpoolStore(tmp_path / "q")
    store.prepare()
    store.open_journal("t2")
    ids = _put(store, 5)
    assert store.journal is not None
    store.journal.close()  # releases the writer's lock, as the death of the process would
    return store, ids


def test_replay_restores_missing_and_torn_files_and_not_finished_ones(tmp_path: Path) -> None:
    store, ids = _crash_leftovers(tmp_path)
    owner = SpoolStore(store.root)
    for q in ids:
        owner.book.note(q, store.segment_of[q])
    store.mail_path(ids[0]).unlink()  # a power cut took the unflushed file
    whole = store.mail_path(ids[1]).read_bytes()
    store.mail_path(ids[1]).write_bytes(whole[:20])  # ... or tore it
    owner._discard(ids[2])  # delivered: files gone, marked done
    store.mail_path(ids[3]).write_bytes(whole)  # a finished message's removal was undone: ...
    owner.book.done(ids[3])  # ... marked done, so it must go again, never be delivered twice
    resumed = sorted(m.id for m in SpoolStore(store.root).recover())
    assert resumed == sorted([ids[0], ids[1], ids[4]])
    for i in (0, 1):
        assert store.read_data_sync(ids[i]) == f"Subject: m{i}\r\n\r\nbody {i}\r\n".encode()
        store.check_whole(ids[i])
    assert not store.mail_path(ids[3]).exists()
    assert list(store.journal_dir.iterdir()) == []  # segments and .done files are gone
    assert list(store.corrupt.iterdir()) == []


def test_replay_leaves_a_live_writers_segment_alone(tmp_path: Path) -> None:
    store = SpoolStore(tmp_path / "q")
    store.prepare()
    store.open_journal("live")
    ids = _put(store, 2)
    store.mail_path(ids[0]).unlink()
    other = SpoolStore(store.root)
    assert other.replay_journal() == 0
    assert other.book.checkpoint_all() == 0
    assert [p.suffix for p in store.journal_dir.iterdir()] == [".log"]


def test_checkpoint_of_a_sealed_segment_drops_it_and_forgets_its_members(tmp_path: Path) -> None:
    store = SpoolStore(tmp_path / "q")
    store.prepare()
    store.open_journal("t3")
    ids = _put(store, 3)
    assert store.journal is not None
    store.journal.tick(time.monotonic() + journal.SEAL_AGE + 1)
    (sealed,) = journal.segments(store.journal_dir, ".sealed")
    for q in ids:
        store.book.note(q, sealed.stem)
    store._discard(ids[0])
    assert store.book.checkpoint_due(time.time()) == 0  # too young: most mail is still in flight
    assert store.book.checkpoint_due(time.time() + journal.CHECKPOINT_AGE + 1) == 1
    assert list(store.journal_dir.iterdir()) == []
    assert store.book.tracked() == 0
    store.book.note(ids[1], sealed.stem)  # a late line for a retired segment changes nothing
    assert store.book.tracked() == 0
    assert sorted(m.id for m in SpoolStore(store.root).recover()) == sorted(ids[1:])


def test_a_failed_flush_refuses_the_put_and_nothing_comes_back(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    store = SpoolStore(tmp_path / "q")
    store.prepare()
    store.open_journal("t4")
    [first] = _put(store, 1)  # the segment exists

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "fdatasync", failing)
    data = b"Subject: x\r\n\r\nx\r\n"
    meta = make_meta(sender="a@src.test", recipients=["b@dst.test"], data=data)
    with pytest.raises(SpoolError, match="spool write failed"):
        asyncio.run(store.put_on_loop(meta, data))
    monkeypatch.undo()
    assert not store.mail_path(meta.id).exists()
    assert list(store.tmp.iterdir()) == []
    assert store.journal is not None
    store.journal.close()
    recovered = {m.id for m in SpoolStore(store.root).recover()}
    assert meta.id not in recovered and first in recovered


def test_a_refused_put_writes_no_record(tmp_path: Path) -> None:
    store = SpoolStore(tmp_path / "q")
    store.prepare()
    store.open_journal("t5")
    data = b"Subject: x\r\n\r\nx\r\n"
    meta = make_meta(sender="a@src.test", recipients=["b@dst.test"], data=data)
    with pytest.raises(SpoolError, match="disk is full"):
        asyncio.run(store.put_on_loop(meta, data, reserve=1 << 60))
    assert list(store.journal_dir.iterdir()) == []
    assert list(store.tmp.iterdir()) == []


def test_an_offline_delete_after_a_crash_is_not_undone_by_the_next_start(tmp_path: Path) -> None:
    from mta.spool.control import apply_offline

    store, ids = _crash_leftovers(tmp_path)  # a killed server's segment is still there
    store.mail_path(ids[0]).unlink()  # and a power cut took one unflushed file
    offline = SpoolStore(store.root)
    offline.lock()
    try:
        assert apply_offline(offline, "delete", ids[1]) == 1
    finally:
        offline.unlock()
    assert sorted(m.id for m in SpoolStore(store.root).recover()) == sorted(ids[:1] + ids[2:])


def test_noting_a_message_never_waits_for_a_flush_of_the_marks(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """`note` runs on the parent's event loop: a slow disk flushing .done marks must not stall it."""
    store = SpoolStore(tmp_path / "q")
    store.prepare()
    store.book.note("0A", "w-1")
    store._discard("0A")  # a mark written, to be flushed
    flushing = threading.Event()
    real = os.fdatasync

    def slow(fd: int) -> None:
        flushing.set()
        time.sleep(0.5)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", slow)
    flusher = threading.Thread(target=store.book.flush_marks)
    flusher.start()
    assert flushing.wait(5)
    started = time.monotonic()
    store.book.note("0B", "w-1")
    took = time.monotonic() - started
    flusher.join(5)
    assert took < 0.2, f"note waited {took:.2f} s for the flush"
    assert store.book.tracked() == 1
