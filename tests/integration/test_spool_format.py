"""The one-file spool format (issue 18) and the old two-file format it still reads.

A message is written once, at submission, as one file (length line, envelope line, data): one
file flush instead of two. Later state goes to <id>.json beside it. A spool written by an older
mta (<id>.json + <id>.eml) must still recover, deliver and drain after an upgrade.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from mta.errors import SpoolError
from mta.model import RecipientStatus
from mta.spool.state import MessageMeta
from mta.spool.store import SpoolStore, make_meta


def new_store(tmp_path: Path) -> SpoolStore:
    store = SpoolStore(tmp_path / "q")
    store.prepare()
    return store


def write_old_format(store: SpoolStore, meta: MessageMeta, data: bytes) -> None:
    """What mta wrote before issue 18: data and envelope in two files."""
    (store.msg / f"{meta.id}.eml").write_bytes(data)
    (store.msg / f"{meta.id}.json").write_text(json.dumps(meta.to_json()))


def test_pwr_3_put_writes_one_file_and_recovers_it(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    data = b"Subject: x\r\n\r\nline one\nline two\r\n{\"not\": \"json\"}\r\n"
    meta = make_meta(sender="s@a.test", recipients=["r@b.test", "q@c.test"], data=data)
    store.put_sync(meta, data)
    assert [p.name for p in store.msg.iterdir()] == [f"{meta.id}.msg"]
    again = {m.id: m for m in SpoolStore(store.root).recover()}
    assert again == {meta.id: meta}
    assert store.read_data_sync(meta.id) == data
    assert store.load_with_data_sync(meta.id) == (meta, data)  # the delivery path's one read
    assert store.ids() == [meta.id] and store.exists(meta.id)


def test_pwr_3_update_overrides_the_envelope_and_remove_leaves_nothing(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    meta = make_meta(sender="s@a.test", recipients=["r@b.test"], data=b"x")
    store.put_sync(meta, b"x")
    later = replace(meta, recipients=(replace(meta.recipients[0], attempts=3),))
    asyncio.run(store.update(later))
    assert sorted(p.name for p in store.msg.iterdir()) == [f"{meta.id}.json", f"{meta.id}.msg"]
    assert store.load_sync(meta.id) == later
    assert [m for m in SpoolStore(store.root).recover()] == [later]
    assert store.read_data_sync(meta.id) == b"x"
    assert store.load_with_data_sync(meta.id) == (later, b"x")  # the newer envelope wins
    assert store.ids() == [meta.id]
    asyncio.run(store.remove(meta.id))
    assert list(store.msg.iterdir()) == [] and not store.exists(meta.id)
    with pytest.raises(SpoolError, match="no such message"):
        store.load_with_data_sync(meta.id)


def test_pwr_3_old_two_file_spool_still_loads_updates_and_drains(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    old = make_meta(sender="s@a.test", recipients=["r@b.test"], data=b"old data\r\n")
    new = make_meta(sender="s@a.test", recipients=["r@b.test"], data=b"new data\r\n")
    write_old_format(store, old, b"old data\r\n")
    store.put_sync(new, b"new data\r\n")
    assert {m.id: m for m in store.recover()} == {old.id: old, new.id: new}
    assert store.ids() == sorted([old.id, new.id])
    assert store.read_data_sync(old.id) == b"old data\r\n" and store.read_data_sync(new.id) == b"new data\r\n"
    done = replace(old, recipients=(replace(old.recipients[0], status=RecipientStatus.DEFERRED, attempts=1),))
    assert store.load_with_data_sync(old.id) == (old, b"old data\r\n")
    asyncio.run(store.update(done))
    assert store.load_sync(old.id) == done
    held = replace(done, held=True)
    asyncio.run(store.update(held))
    (store.msg / f"{old.id}.eml").unlink()  # a held message's data is not read (nor needed)
    assert store.load_with_data_sync(old.id) == (held, b"")
    asyncio.run(store.remove(old.id))
    assert sorted(p.name for p in store.msg.iterdir()) == [f"{new.id}.msg"]


def test_pwr_3_torn_file_goes_to_corrupt_with_its_state(tmp_path: Path) -> None:
    """A .msg renamed into place before its data reached the disk (only possible when a flush was
    skipped or the disk lied): never delivered truncated, kept for the operator."""
    store = new_store(tmp_path)
    metas = [make_meta(sender="s@a.test", recipients=["r@b.test"], data=b"0123456789") for _ in range(3)]
    for m in metas:
        store.put_sync(m, b"0123456789")
    truncated, empty, whole = metas
    path = store.mail_path(truncated.id)
    path.write_bytes(path.read_bytes()[:-3])
    asyncio.run(store.update(replace(truncated, held=True)))  # its later state goes along
    store.mail_path(empty.id).write_bytes(b"")
    assert [m.id for m in store.recover()] == [whole.id]
    assert sorted(p.name for p in store.corrupt.iterdir()) == sorted(
        [f"{truncated.id}.json", f"{truncated.id}.msg", f"{empty.id}.msg"])
    assert sorted(p.name for p in store.msg.iterdir()) == [f"{whole.id}.msg"]


def test_pwr_3_state_left_by_an_interrupted_removal_is_dropped(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    meta = make_meta(sender="s@a.test", recipients=["r@b.test"], data=b"x")
    store.put_sync(meta, b"x")
    asyncio.run(store.update(meta))
    os.unlink(store.mail_path(meta.id))  # removal: the data went first, then the crash
    assert list(store.recover()) == []
    assert list(store.msg.iterdir()) == [] and list(store.corrupt.iterdir()) == []


def test_pwr_4_a_fresh_message_is_read_in_one_open_yet_an_update_still_wins(tmp_path: Path) -> None:
    """The delivery hot path (issue 18): a message noted from a journal segment skips the search
    for a <id>.json, unless this process wrote one; removal leaves nothing either way."""
    store = new_store(tmp_path)
    metas = [make_meta(sender="s@a.test", recipients=["r@b.test"], data=b"x\r\n") for _ in range(2)]
    for m in metas:
        store.put_sync(m, b"x\r\n")
        store.book.note(m.id, "123-456-1")
        assert store.fresh(m.id)
        assert store.load_with_data_sync(m.id) == (m, b"x\r\n")
    updated = metas[0]  # the other one is never updated
    later = replace(updated, recipients=(replace(updated.recipients[0], attempts=2),))
    asyncio.run(store.update(later))
    assert not store.book.only_msg(updated.id) and store.book.only_msg(metas[1].id)
    assert store.load_with_data_sync(updated.id) == (later, b"x\r\n")
    for m in metas:
        asyncio.run(store.remove(m.id))
        assert not store.fresh(m.id)
    assert list(store.msg.iterdir()) == []
