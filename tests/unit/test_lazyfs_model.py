"""The durable-view bookkeeping of the power-loss file system (pure; the FUSE side is in
tests/integration/test_lazyfs.py)."""

from __future__ import annotations

import random

from tests.support.lazyfs_model import Disk, Node


def _files(disk: Disk, live: dict[int, bytes] | None = None, writeback: float = 0.0,
           seed: int = 0) -> dict[str, object]:
    """The cut as {path: bytes}; `live` gives a node's current bytes by id (for writeback)."""
    live = live or {}
    tree = disk.cut(lambda n: len(live.get(id(n), b"")),
                    lambda n: lambda off, length: live.get(id(n), b"")[off:off + length],
                    writeback=writeback, rng=random.Random(seed))
    out: dict[str, object] = {}

    def walk(t: dict[str, object], prefix: str) -> None:
        for name, (_mode, content) in t.items():  # type: ignore[misc]
            if isinstance(content, dict):
                out[prefix + name + "/"] = None
                walk(content, prefix + name + "/")
            else:
                out[prefix + name] = "MOUNT-TIME" if isinstance(content, Node) else content

    walk(tree, "/")
    return out


def _write(disk: Disk, node: Node, live: dict[int, bytes], data: bytes, offset: int = 0) -> None:
    old = live.get(id(node), b"")
    live[id(node)] = old[:offset].ljust(offset, b"\0") + data + old[offset + len(data):]
    disk.wrote(node, offset, len(data))


def _fsync(disk: Disk, node: Node, live: dict[int, bytes]) -> None:
    data = live.get(id(node), b"")
    disk.fsync(node, len(data), lambda off, n: data[off:off + n])


def test_lazyfs_model_1_new_file_needs_both_flushes() -> None:
    disk, live = Disk(), {}
    a = disk.create("/a", False, 0o600)
    _write(disk, a, live, b"hello")
    assert _files(disk) == {}
    disk.fsync_dir(disk.root)
    assert _files(disk) == {"/a": b""}  # name durable, data not
    _fsync(disk, a, live)
    assert _files(disk) == {"/a": b"hello"}


def test_lazyfs_model_2_rename_and_unlink_wait_for_the_folder() -> None:
    disk = Disk()
    disk.add_existing("/old", False, 0o644)
    disk.keep_old_bytes(disk.lookup("/old"), lambda: b"v1")
    disk.rename("/old", "/new")
    assert _files(disk) == {"/old": b"v1"}
    disk.fsync_dir(disk.root)
    assert _files(disk) == {"/new": b"v1"}
    disk.unlink("/new")
    assert _files(disk) == {"/new": b"v1"}
    disk.fsync_dir(disk.root)
    assert _files(disk) == {}


def test_lazyfs_model_3_mount_time_files_are_kept_until_changed() -> None:
    disk = Disk()
    disk.add_existing("/d", True, 0o755)
    disk.add_existing("/d/f", False, 0o644)
    assert _files(disk) == {"/d/": None, "/d/f": "MOUNT-TIME"}


def test_lazyfs_model_4_truncate_and_extend_are_durable_at_fsync() -> None:
    disk, live = Disk(), {}
    f = disk.create("/f", False, 0o644)
    disk.fsync_dir(disk.root)
    _write(disk, f, live, b"abcdef")
    _fsync(disk, f, live)
    live[id(f)] = b"ab"
    disk.truncated(f, 6, 2)
    assert _files(disk) == {"/f": b"abcdef"}
    _fsync(disk, f, live)
    assert _files(disk) == {"/f": b"ab"}
    _write(disk, f, live, b"Z", offset=4)
    _fsync(disk, f, live)
    assert _files(disk) == {"/f": b"ab\0\0Z"}


def test_lazyfs_model_5_writeback_one_flushes_everything_zero_nothing() -> None:
    for writeback, expected in ((1.0, {"/f": b"x" * 5000}), (0.0, {})):
        disk, live = Disk(), {}
        f = disk.create("/f", False, 0o644)
        _write(disk, f, live, b"x" * 5000)
        assert _files(disk, live, writeback=writeback) == expected


def test_lazyfs_model_6_fuse_hidden_names_never_survive() -> None:
    disk = Disk()
    disk.create("/.fuse_hidden0001", False, 0o644)
    disk.fsync_dir(disk.root)
    assert _files(disk) == {}
