"""The power-loss file system itself (tests/support/lazyfs.py), on a real FUSE mount.

Its semantics are pinned here before it judges the spool (tests/e2e/test_powercut.py): data is
durable at fsync of the file, a name at fsync of its folder, and a cut leaves exactly that.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from mta.db import open_wal
from mta.spool.store import fsync_dir
from tests.support.powercut import LazyFs, require_fuse


@pytest.fixture
def fs(tmp_path: Path) -> Iterator[LazyFs]:
    require_fuse()
    lazy = LazyFs(tmp_path / "disk", tmp_path / "mnt").mount()
    try:
        yield lazy
    finally:
        lazy.unmount()


def write(path: Path, data: bytes, *, sync: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def test_lazyfs_1_data_without_fsync_is_gone_after_a_cut(fs: LazyFs) -> None:
    m = fs.mountpoint
    write(m / "a", b"never flushed", sync=False)
    fsync_dir(m)  # the name is durable, the data is not: a real disk shows an empty file
    fs.cut()
    assert (fs.backing / "a").read_bytes() == b""


def test_lazyfs_2_a_name_without_folder_fsync_is_gone(fs: LazyFs) -> None:
    m = fs.mountpoint
    write(m / "a", b"flushed data", sync=True)  # data flushed, but its name never was
    (m / "sub").mkdir()
    fs.cut()
    assert list(fs.backing.iterdir()) == []


def test_lazyfs_3_rename_without_folder_fsync_is_undone(fs: LazyFs) -> None:
    m = fs.mountpoint
    write(m / "old", b"v1", sync=True)
    fsync_dir(m)
    write(m / "tmp", b"v2", sync=True)
    os.rename(m / "tmp", m / "old")
    os.rename(m / "old", m / "new")
    assert (m / "new").read_bytes() == b"v2"
    fs.cut()
    assert sorted(p.name for p in fs.backing.iterdir()) == ["old"]
    assert (fs.backing / "old").read_bytes() == b"v1"


def test_lazyfs_4_with_both_fsyncs_everything_survives(fs: LazyFs) -> None:
    m = fs.mountpoint
    (m / "q").mkdir()
    fsync_dir(m)
    write(m / "q" / "tmp", b"payload", sync=True)
    os.rename(m / "q" / "tmp", m / "q" / "final")
    fsync_dir(m / "q")
    fs.cut()
    assert [p.name for p in (fs.backing / "q").iterdir()] == ["final"]
    assert (fs.backing / "q" / "final").read_bytes() == b"payload"


def test_lazyfs_5_unlink_and_overwrite_of_mount_time_files_are_undone(fs: LazyFs) -> None:
    m = fs.mountpoint
    write(m / "keep", b"original", sync=True)
    write(m / "gone", b"still here", sync=True)
    fsync_dir(m)
    fs.cut()
    fs.mount()  # a second boot: both files are now mount-time files
    with open(m / "keep", "r+b") as f:
        f.write(b"CHANGED!")
    os.unlink(m / "gone")
    fs.cut()
    assert (fs.backing / "keep").read_bytes() == b"original"
    assert (fs.backing / "gone").read_bytes() == b"still here"


def test_lazyfs_6_clean_unmount_keeps_everything(fs: LazyFs) -> None:
    write(fs.mountpoint / "a", b"not flushed, but the machine shut down cleanly", sync=False)
    fs.unmount()
    assert (fs.backing / "a").read_bytes().startswith(b"not flushed")
    fs.mount()
    assert (fs.mountpoint / "a").exists()


def test_lazyfs_7_full_writeback_behaves_like_a_flushed_disk(fs: LazyFs) -> None:
    m = fs.mountpoint
    write(m / "a", b"x" * 10000, sync=False)
    fs.cut(writeback=1.0)
    assert (fs.backing / "a").read_bytes() == b"x" * 10000


def test_lazyfs_8_partial_writeback_tears_files_at_page_boundaries(fs: LazyFs) -> None:
    m = fs.mountpoint
    write(m / "a", b"a" * (4096 * 16), sync=True)
    fsync_dir(m)
    with open(m / "a", "r+b") as f:
        f.write(b"b" * (4096 * 16))  # never flushed: the kernel may have written back some pages
    fs.cut(writeback=0.5, seed=3)
    data = (fs.backing / "a").read_bytes()
    pages = {data[i:i + 4096] for i in range(0, len(data), 4096)}
    assert len(data) == 4096 * 16
    assert pages == {b"a" * 4096, b"b" * 4096}  # torn: old and new pages side by side


def test_lazyfs_9_frozen_mount_refuses_everything(fs: LazyFs) -> None:
    fs.freeze_and_cut()
    with pytest.raises(OSError):
        (fs.mountpoint / "late").write_bytes(b"after the power went")
    fs.unmount()
    assert not (fs.backing / "late").exists()


@pytest.mark.parametrize("synchronous", ["FULL", "NORMAL"])
def test_lazyfs_10_sqlite_wal_commits_after_a_cut(fs: LazyFs, synchronous: str) -> None:
    """What the policy cache (NORMAL) and the TLS-RPT store (FULL) keep (both via mta.db.open_wal).

    FULL fsyncs the WAL at every commit, so every commit survives. NORMAL fsyncs only at
    checkpoints: commits since the last one may be lost (on a fresh file all of them, the schema
    too, which the next open_wal recreates), but the database always opens intact.
    SQLite fsyncs the folder when it creates the WAL, so the database file's name is durable too.
    """
    path = fs.mountpoint / "t.db"
    schema = "CREATE TABLE IF NOT EXISTS t (v INTEGER);"
    conn = open_wal(path, schema=schema, synchronous=synchronous)
    for i in range(20):
        conn.execute("INSERT INTO t VALUES (?)", (i,))
    fs.freeze_and_cut()
    with contextlib.suppress(sqlite3.Error):
        conn.close()  # the frozen mount refuses it, as a dying process would never get there
    fs.unmount()
    fs.mount()
    conn = open_wal(path, schema=schema, synchronous=synchronous)  # as mta reopens it at start
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        rows = [r[0] for r in conn.execute("SELECT v FROM t ORDER BY v")]
    finally:
        conn.close()
    if synchronous == "FULL":
        assert rows == list(range(20))
    else:
        assert rows == list(range(len(rows)))  # a prefix of the commits, never a torn one
