"""The submission child's put on its event loop (mta/spool/loopput.py, issue 18 target 3).

PWR-4 for the journal's one put path: the caller returns only after a flush that started after its
record was written; one flush covers a batch; a failed flush fails its batch only; a put that
needs a new segment still works (opened off the loop). Batches sharing flushes, and a failed or
refused put leaving nothing to replay: tests/integration/test_journal.py.
"""

from __future__ import annotations

import asyncio
import errno
import threading
import time
from pathlib import Path

import pytest

from mta.spool import journal
from mta.spool.loopput import LoopFlush
from mta.spool.state import MessageMeta
from mta.spool.store import SpoolStore, make_meta

pytestmark = pytest.mark.req("PWR-4")


def test_callers_during_a_flush_wait_for_the_next_one() -> None:
    """Records written while a flush runs may postdate its start: their callers wait for the next."""
    written = 0  # "records" written so far
    covered: list[int] = []  # what each flush covered: the count when it started
    gate = threading.Event()

    def flush() -> None:
        covered.append(written)
        assert gate.wait(5)

    async def main() -> None:
        nonlocal written
        group = LoopFlush(flush)
        returned: dict[int, int] = {}  # caller -> flushes finished when it returned

        async def caller(i: int) -> None:
            nonlocal written
            written += 1
            mine = written
            await group.sync()
            returned[i] = len(covered) if gate.is_set() else -1
            assert any(c >= mine for c in covered[: returned[i]]), (i, covered)

        first = asyncio.ensure_future(caller(0))
        await asyncio.sleep(0.05)  # the first flush runs, blocked on the gate
        late = [asyncio.ensure_future(caller(i)) for i in range(1, 6)]
        await asyncio.sleep(0.05)
        assert not first.done() and covered == [1]
        gate.set()
        await asyncio.wait_for(asyncio.gather(first, *late), 5)
        assert covered == [1, 6]  # two flushes for six callers: the second covers the five late ones
        assert group.flushes == 2

    asyncio.run(main())


def test_a_failed_flush_fails_its_batch_only() -> None:
    calls = 0

    def flush() -> None:
        nonlocal calls
        calls += 1
        time.sleep(0.02)
        if calls == 1:
            raise OSError(errno.EIO, "I/O error")

    async def main() -> None:
        group = LoopFlush(flush)
        # The first caller starts the flush that fails; the other two asked while it ran, so the
        # next flush covers them, and it succeeds.
        batch = [asyncio.ensure_future(group.sync()) for _ in range(3)]
        results = await asyncio.gather(*batch, return_exceptions=True)
        assert isinstance(results[0], OSError) and results[0].errno == errno.EIO
        assert results[1:] == [None, None]
        assert calls == 2
        await group.sync()
        assert calls == 3

    asyncio.run(main())


def test_a_caller_that_goes_away_does_not_break_its_batch() -> None:
    async def main() -> None:
        group = LoopFlush(lambda: time.sleep(0.05))
        gone = asyncio.ensure_future(group.sync())
        stays = asyncio.ensure_future(group.sync())
        await asyncio.sleep(0.01)
        gone.cancel()
        await asyncio.wait_for(stays, 5)
        assert gone.cancelled()

    asyncio.run(main())


def _message(i: int) -> tuple[MessageMeta, bytes]:
    data = f"Subject: m{i}\r\n\r\nbody {i}\r\n".encode() + b"x" * 2000
    return make_meta(sender="a@src.test", recipients=[f"r{i}@dst.test"], data=data), data


def test_a_put_that_needs_a_new_segment_opens_it_off_the_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(journal, "SEGMENT_BYTES", 16 << 10)  # a few messages per segment
    store = SpoolStore(tmp_path / "q")
    store.prepare()
    store.open_journal("loop2")
    loop_thread = threading.get_ident()
    opened_in: list[int] = []
    real_open = journal.JournalWriter._open

    def spying_open(self: journal.JournalWriter, need: int) -> object:
        opened_in.append(threading.get_ident())
        return real_open(self, need)

    monkeypatch.setattr(journal.JournalWriter, "_open", spying_open)
    messages = [_message(i) for i in range(20)]

    async def main() -> None:
        for meta, data in messages:  # one after another: each segment fills, then the next opens
            await store.put_on_loop(meta, data)

    asyncio.run(main())
    assert len(opened_in) >= 3 and loop_thread not in opened_in
    found = set()
    for seg in store.journal_dir.iterdir():
        if seg.suffix in (".log", ".sealed"):
            found |= {journal.record_id(env) for env, _ in journal.decode(seg.read_bytes())}
    assert found == {m.id for m, _ in messages}
