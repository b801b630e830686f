"""The durable spool on a real disk: put, recover, update, debris and corrupt entries, the lock."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from mta.errors import SpoolError
from mta.model import RecipientStatus
from mta.spool import control
from mta.spool.state import MessageMeta
from mta.spool.store import SpoolStore, make_meta


def new_store(tmp_path: Path) -> SpoolStore:
    store = SpoolStore(tmp_path / "q")
    store.prepare()
    return store


async def test_put_then_recover_every_message(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    metas = [make_meta(sender="s@a.test", recipients=[f"r{i}@b.test"], data=b"Subject: x\r\n\r\nbody %d\r\n" % i)
             for i in range(50)]
    await asyncio.gather(*(store.put(m, b"data-" + m.id.encode()) for m in metas))
    assert not list(store.tmp.iterdir())
    again = {m.id: m for m in SpoolStore(tmp_path / "q").recover()}
    assert set(again) == {m.id for m in metas}
    for m in metas:
        assert again[m.id] == m
        assert store.read_data_sync(m.id) == b"data-" + m.id.encode()


async def test_update_is_atomic_and_remove_forgets(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    meta = make_meta(sender="", recipients=["a@b.test"], data=b"x")
    await store.put(meta, b"x")
    from dataclasses import replace
    held = replace(meta, held=True)
    await store.update(held)
    assert store.load_sync(meta.id).held is True
    assert not list(store.tmp.iterdir())
    await store.remove(meta.id)
    assert store.ids() == []
    assert list(store.msg.iterdir()) == []


def test_recover_cleans_debris_and_quarantines_corrupt_meta(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    (store.tmp / "half.eml").write_bytes(b"partial")          # crash while writing
    (store.msg / "ORPHAN1.eml").write_bytes(b"no envelope")   # crash between the two renames
    (store.msg / "ORPHAN2.json").write_text("{}")             # envelope without data
    (store.msg / "BAD.json").write_text("{not json")
    (store.msg / "BAD.eml").write_bytes(b"x")
    assert list(store.recover()) == []
    assert list(store.msg.iterdir()) == []
    # The data goes along with its unreadable envelope, so no later start deletes it as debris.
    assert sorted(p.name for p in store.corrupt.iterdir()) == ["BAD.eml", "BAD.json"]
    assert list(store.tmp.iterdir()) == []


def test_second_lock_refused_with_clear_error(tmp_path: Path) -> None:
    a, b = SpoolStore(tmp_path / "q"), SpoolStore(tmp_path / "q")
    a.lock()
    try:
        with pytest.raises(SpoolError, match=rf"in use by another mta \(pid {os.getpid()}\)"):
            b.lock()
        assert b.is_locked_by_other()
    finally:
        a.unlock()
    b.lock()
    b.unlock()


def test_unwritable_spool_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(SpoolError, match="not writable"):
        SpoolStore(blocker / "q").prepare()


async def test_failed_put_leaves_nothing(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    meta = make_meta(sender="", recipients=["a@b.test"], data=b"x")
    os.chmod(store.tmp, 0o500)
    try:
        if os.access(store.tmp, os.W_OK):  # root ignores permissions: use a missing folder instead
            os.chmod(store.tmp, 0o700)
            store.tmp.rmdir()
        with pytest.raises(SpoolError):
            await store.put(meta, b"x")
    finally:
        store.tmp.mkdir(exist_ok=True)
        os.chmod(store.tmp, 0o700)
    assert store.ids() == []
    assert list(store.msg.iterdir()) == []


def test_offline_control_flush_hold_release_delete(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    meta = make_meta(sender="s@a.test", recipients=["a@b.test"], data=b"x", now=10.0)
    from dataclasses import replace
    meta = replace(meta, recipients=tuple(replace(r, status=RecipientStatus.DEFERRED, next_attempt=1e12)
                                          for r in meta.recipients))
    asyncio.run(store.put(meta, b"x"))
    assert control.apply_offline(store, "flush", None) == 1
    assert store.load_sync(meta.id).recipients[0].next_attempt < 1e12
    control.apply_offline(store, "hold", meta.id)
    assert store.load_sync(meta.id).held
    control.apply_offline(store, "release", meta.id)
    assert not store.load_sync(meta.id).held
    control.apply_offline(store, "delete", meta.id)
    assert store.ids() == []
    with pytest.raises(SpoolError, match="no such message"):
        control.apply_offline(store, "hold", meta.id)


def test_ctl_requests_round_trip(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    control.submit(store, "flush", None)
    control.submit(store, "hold", "ABC")
    (store.ctl / "junk.json").write_text("nonsense")
    reqs = control.take_requests(store)
    assert reqs == [{"op": "flush", "id": None}, {"op": "hold", "id": "ABC"}]
    assert list(store.ctl.iterdir()) == []


def test_meta_file_is_plain_json_with_schema(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    meta = make_meta(sender="s@a.test", recipients=["a@b.test"], data=b"x")
    asyncio.run(store.put(meta, b"x"))
    data = json.loads(store.state_bytes(meta.id))
    assert data["schema"] == 1 and data["recipients"][0]["status"] == "queued"
    assert MessageMeta.from_json(data) == meta


async def test_group_commit_many_concurrent_puts_all_complete(tmp_path: Path) -> None:
    """Directory fsyncs are shared across writers; every put still returns (no live-lock) and is durable."""
    store = new_store(tmp_path)
    metas = [make_meta(sender="s@a.test", recipients=["r@b.test"], data=b"x") for _ in range(300)]

    async def staggered(i: int, meta: MessageMeta) -> None:
        await asyncio.sleep((i % 7) * 0.001)
        await store.put(meta, b"x")

    await asyncio.wait_for(asyncio.gather(*(staggered(i, m) for i, m in enumerate(metas))), timeout=30)
    assert len(store.ids()) == 300
