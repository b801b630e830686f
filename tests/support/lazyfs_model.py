"""What a disk holds after a power cut: the durable view behind tests/support/lazyfs.py.

Pure bookkeeping, no I/O: file contents come in through the `read` callbacks the FUSE adapter
passes. The model follows POSIX to the letter, as LazyFS does, not one file system's kindness:

- file data (and size) become durable only at fsync/fdatasync of that file;
- a create, rename, unlink, mkdir or rmdir becomes durable only at fsync of the directory that
  holds the name (a rename across folders: the new name at fsync of the target folder, the old
  name's removal at fsync of the source folder);
- a power cut keeps exactly that: a name that was never made durable is gone, a rename that was
  not is undone, a file whose name is durable but whose data is not has its last durable data
  (empty for a new file: the "half-written state file" of a crash).

`writeback` (0..1) models what the kernel wrote back on its own before the cut: each dirty 4 KiB
page, each pending size change and each folder's pending entries reach the disk with that
probability. 0 is the strictest disk; a higher value makes torn files (durable name, part of the
data) likely.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

PAGE = 4096
# libfuse renames an unlinked-but-open file to such a name until its last close; on a real disk
# that is an orphan inode that never survives a reboot.
HIDDEN_PREFIX = ".fuse_hidden"

ReadAll = Callable[[], bytes]
ReadRange = Callable[[int, int], bytes]


@dataclass(eq=False)
class Node:
    """One inode. `durable is None`: unchanged since mount (its bytes are still the backing file's)."""

    is_dir: bool
    mode: int = 0o644
    durable: bytearray | None = None
    dirty: list[tuple[int, int]] = field(default_factory=list)  # byte ranges written since last fsync
    entries: dict[str, Node] = field(default_factory=dict)  # folders: the live names
    durable_entries: dict[str, Node] = field(default_factory=dict)  # folders: the names on disk


@dataclass
class Stats:
    fsyncs: int = 0
    dir_fsyncs: int = 0
    cuts: int = 0


class Disk:
    """The live tree (what processes see) and the durable tree (what survives a cut)."""

    def __init__(self) -> None:
        self.root = Node(is_dir=True, mode=0o755)
        self.stats = Stats()

    # -- the tree at mount: everything on the backing folder is durable ----------------------------

    def add_existing(self, path: str, is_dir: bool, mode: int) -> None:
        parent, name = self._parent(path)
        node = Node(is_dir=is_dir, mode=mode)
        parent.entries[name] = node
        parent.durable_entries[name] = node

    # -- lookups ------------------------------------------------------------------------------------

    def lookup(self, path: str) -> Node:
        node = self.root
        for part in _parts(path):
            child = node.entries.get(part)
            if child is None:
                raise FileNotFoundError(path)
            node = child
        return node

    def _parent(self, path: str) -> tuple[Node, str]:
        parts = _parts(path)
        if not parts:
            raise PermissionError("the root has no parent")
        parent = self.lookup("/" + "/".join(parts[:-1]))
        if not parent.is_dir:
            raise NotADirectoryError(path)
        return parent, parts[-1]

    # -- namespace changes (live at once, durable at fsync of the folder) ---------------------------

    def create(self, path: str, is_dir: bool, mode: int) -> Node:
        parent, name = self._parent(path)
        node = Node(is_dir=is_dir, mode=mode, durable=None if is_dir else bytearray())
        parent.entries[name] = node
        return node

    def unlink(self, path: str) -> Node:
        """Drop a live name (call keep_old_bytes on the node first: the disk may still need them)."""
        parent, name = self._parent(path)
        return parent.entries.pop(name)

    def rename(self, old: str, new: str) -> None:
        """Move a live name (keep_old_bytes first on a file the rename replaces)."""
        src, old_name = self._parent(old)
        dst, new_name = self._parent(new)
        node = src.entries.pop(old_name)
        dst.entries[new_name] = node

    def fsync_dir(self, node: Node) -> None:
        self.stats.dir_fsyncs += 1
        node.durable_entries = {k: v for k, v in node.entries.items() if not k.startswith(HIDDEN_PREFIX)}

    # -- data (live at once, durable at fsync of the file) ------------------------------------------

    @staticmethod
    def keep_old_bytes(node: Node, read_all: ReadAll) -> None:
        """Call before a backing file changes or goes: keeps mount-time bytes the disk still holds."""
        if not node.is_dir and node.durable is None:
            node.durable = bytearray(read_all())

    def wrote(self, node: Node, offset: int, length: int) -> None:
        if length > 0:
            node.dirty.append((offset, offset + length))

    def truncated(self, node: Node, old_size: int, new_size: int) -> None:
        node.dirty.append((min(old_size, new_size), max(old_size, new_size)))

    def fsync(self, node: Node, size: int, read: ReadRange) -> None:
        self.stats.fsyncs += 1
        if node.is_dir or node.durable is None:
            return
        _apply(node, node.dirty, size, read)
        node.dirty = []

    # -- the cut ------------------------------------------------------------------------------------

    def cut(self, sizes: Callable[[Node], int], read: Callable[[Node], ReadRange], *,
            writeback: float = 0.0, rng: random.Random | None = None) -> dict[str, object]:
        """What the disk holds now: {name: (mode, bytes | Node (unchanged since mount) | dict (a folder))}.

        `sizes`/`read` give a live node's current size and bytes (for pages written back).
        """
        self.stats.cuts += 1
        rng = rng or random.Random(0)
        if writeback > 0:
            for node in self._live_nodes():
                if node.is_dir:
                    if rng.random() < writeback:
                        self.fsync_dir(node)
                elif node.durable is not None and node.dirty:
                    _writeback(node, sizes(node), read(node), writeback, rng)
        return self._durable_tree(self.root)

    def _durable_tree(self, folder: Node) -> dict[str, object]:
        out: dict[str, object] = {}
        for name, node in folder.durable_entries.items():
            if node.is_dir:
                out[name] = (node.mode, self._durable_tree(node))
            else:
                out[name] = (node.mode, node if node.durable is None else bytes(node.durable))
        return out

    def _live_nodes(self) -> Iterator[Node]:
        stack = [self.root]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.entries.values())

    def live_paths(self) -> dict[int, str]:
        """id(node) -> current path, for reading unchanged files at the cut."""
        out: dict[int, str] = {}
        stack: list[tuple[Node, str]] = [(self.root, "")]
        while stack:
            node, path = stack.pop()
            out[id(node)] = path or "/"
            stack.extend((child, f"{path}/{name}") for name, child in node.entries.items())
        return out


def _parts(path: str) -> list[str]:
    return [p for p in path.split("/") if p]


def _apply(node: Node, ranges: list[tuple[int, int]], size: int, read: ReadRange) -> None:
    """Make `ranges` of the live file (now `size` bytes long) durable, and its size."""
    assert node.durable is not None
    data = node.durable
    if len(data) < size:
        data.extend(b"\0" * (size - len(data)))
    del data[size:]
    for start, end in _merge(ranges):
        end = min(end, size)
        if start < end:
            data[start:end] = read(start, end - start).ljust(end - start, b"\0")


def _writeback(node: Node, size: int, read: ReadRange, p: float, rng: random.Random) -> None:
    """Some dirty pages (and maybe the new size) reached the disk before the cut."""
    assert node.durable is not None
    new_size = size if rng.random() < p else len(node.durable)
    pages: list[tuple[int, int]] = []
    for start, end in _merge(node.dirty):
        for page in range(start // PAGE, (end + PAGE - 1) // PAGE):
            lo, hi = max(start, page * PAGE), min(end, (page + 1) * PAGE)
            if lo < hi and hi <= new_size and rng.random() < p:
                pages.append((lo, hi))
    _apply(node, pages, new_size, read)


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out
