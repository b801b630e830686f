"""A FUSE file system that can lose power: pass-through to a backing folder, durable view kept aside.

    python -m tests.support.lazyfs BACKING MOUNTPOINT      (driven by tests/support/powercut.py)

Every operation goes straight to the backing folder, so processes on the mount see a normal file
system. Beside it, lazyfs_model.Disk records what a disk would hold: data at fsync of the file,
names at fsync of the folder (as the LazyFS tool does). A power cut freezes the mount (every
later operation fails with EIO, nothing reaches the backing folder any more) and rewrites the
backing folder to the durable view, so the next mount starts from what a real disk would show
after losing power.

Control protocol, one line each way on stdin/stdout:
    ready                         (printed once the mount is up)
    cut WRITEBACK SEED  -> cut fsyncs=N dir_fsyncs=M   (then the controller unmounts)
    stats               -> {"fsyncs": N, "dir_fsyncs": M, "cuts": K}
End of stdin (the controller is gone) unmounts.

Not modelled (nothing under test uses them): hard links, symlinks, device nodes, xattrs.
Locks (flock, fcntl) are left to the kernel, which keeps them per mount.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import mfusepy

from tests.support.lazyfs_model import Disk, Node


def _eio() -> mfusepy.FuseOSError:
    return mfusepy.FuseOSError(errno.EIO)


class PowerLossFs(mfusepy.Operations):
    use_ns = True

    def __init__(self, backing: Path, mountpoint: Path) -> None:
        self.backing = backing
        self.mountpoint = mountpoint
        self.disk = Disk()
        self._mutex = threading.Lock()
        self.frozen = False
        self.handles: dict[int, Node] = {}
        for dirpath, dirnames, filenames in os.walk(backing):
            rel = "/" + os.path.relpath(dirpath, backing).lstrip(".")
            for name in dirnames + filenames:
                st = os.lstat(os.path.join(dirpath, name))
                self.disk.add_existing(f"{rel.rstrip('/')}/{name}", stat.S_ISDIR(st.st_mode),
                                       stat.S_IMODE(st.st_mode))

    def _real(self, path: str) -> str:
        return os.path.join(self.backing, path.lstrip("/"))

    def _check(self) -> None:
        if self.frozen:
            raise _eio()

    def _read_all(self, path: str) -> Any:
        return lambda: Path(self._real(path)).read_bytes()

    # -- the control thread --------------------------------------------------------------------------

    def init(self, path: str) -> None:
        threading.Thread(target=self._control, daemon=True).start()
        print("ready", flush=True)

    def _control(self) -> None:
        for line in sys.stdin:
            words = line.split()
            if words and words[0] == "cut":
                writeback = float(words[1]) if len(words) > 1 else 0.0
                seed = int(words[2]) if len(words) > 2 else 0
                self.power_cut(writeback, seed)
                s = self.disk.stats
                print(f"cut fsyncs={s.fsyncs} dir_fsyncs={s.dir_fsyncs}", flush=True)
            elif words and words[0] == "stats":
                print(json.dumps(vars(self.disk.stats)), flush=True)
        _unmount(self.mountpoint)

    def power_cut(self, writeback: float, seed: int) -> None:
        with self._mutex:
            self.frozen = True
            paths = self.disk.live_paths()

            def size(node: Node) -> int:
                return os.stat(self._real(paths[id(node)])).st_size

            def reader(node: Node) -> Any:
                real = self._real(paths[id(node)])

                def read(offset: int, length: int) -> bytes:
                    with open(real, "rb") as f:
                        f.seek(offset)
                        return f.read(length)
                return read

            tree = self.disk.cut(size, reader, writeback=writeback, rng=random.Random(seed))
            staging = self.backing.parent / f".{self.backing.name}.powercut"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            self._materialize(tree, staging, paths)
            for child in list(self.backing.iterdir()):
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
            for child in list(staging.iterdir()):
                os.rename(child, self.backing / child.name)
            staging.rmdir()

    def _materialize(self, tree: dict[str, Any], folder: Path, paths: dict[int, str]) -> None:
        for name, (mode, content) in tree.items():
            target = folder / name
            if isinstance(content, dict):
                target.mkdir(mode=mode)
                self._materialize(content, target, paths)
                continue
            if isinstance(content, Node):  # unchanged since mount: still the live file's bytes
                content = Path(self._real(paths[id(content)])).read_bytes()
            target.write_bytes(content)
            os.chmod(target, mode)

    # -- attributes and folders -----------------------------------------------------------------------

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        self._check()
        if path is None and fh not in self.handles:
            raise _eio()
        st = os.lstat(self._real(path)) if path is not None else os.fstat(fh or 0)
        keys = ("st_mode", "st_nlink", "st_size", "st_uid", "st_gid", "st_blocks")
        attrs: dict[str, Any] = {k: getattr(st, k) for k in keys}
        attrs.update(st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns, st_ctime=st.st_ctime_ns)
        return attrs

    def access(self, path: str, amode: int) -> int:
        self._check()
        if not os.path.lexists(self._real(path)):
            raise mfusepy.FuseOSError(errno.ENOENT)
        return 0

    def statfs(self, path: str) -> dict[str, int]:
        self._check()
        st = os.statvfs(self.backing)
        keys = ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_favail",
                "f_namemax")
        return {k: getattr(st, k) for k in keys}

    def readdir(self, path: str, fh: int) -> list[str]:
        self._check()
        return [".", "..", *os.listdir(self._real(path))]

    def opendir(self, path: str) -> int:
        self._check()
        return 0

    def fsyncdir(self, path: str, datasync: int, fh: int) -> int:
        with self._mutex:
            self._check()
            self.disk.fsync_dir(self.disk.lookup(path))
        return 0

    def mkdir(self, path: str, mode: int) -> int:
        with self._mutex:
            self._check()
            os.mkdir(self._real(path), mode)
            self.disk.create(path, True, mode & 0o7777)
        return 0

    def rmdir(self, path: str) -> int:
        with self._mutex:
            self._check()
            os.rmdir(self._real(path))
            self.disk.unlink(path)
        return 0

    def unlink(self, path: str) -> int:
        with self._mutex:
            self._check()
            self.disk.keep_old_bytes(self.disk.lookup(path), self._read_all(path))
            os.unlink(self._real(path))
            self.disk.unlink(path)
        return 0

    def rename(self, old: str, new: str) -> int:
        with self._mutex:
            self._check()
            try:
                replaced: Node | None = self.disk.lookup(new)
            except FileNotFoundError:
                replaced = None
            if replaced is not None and replaced is not self.disk.lookup(old):
                self.disk.keep_old_bytes(replaced, self._read_all(new))
            os.rename(self._real(old), self._real(new))
            self.disk.rename(old, new)
        return 0

    def chmod(self, path: str, mode: int) -> int:
        with self._mutex:
            self._check()
            os.chmod(self._real(path), mode)
            self.disk.lookup(path).mode = mode & 0o7777
        return 0

    def chown(self, path: str, uid: int, gid: int) -> int:
        self._check()
        os.chown(self._real(path), uid, gid)
        return 0

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        self._check()
        os.utime(self._real(path), ns=times) if times else os.utime(self._real(path))
        return 0

    def link(self, target: str, source: str) -> int:
        raise mfusepy.FuseOSError(errno.EPERM)

    def symlink(self, target: str, source: str) -> int:
        raise mfusepy.FuseOSError(errno.EPERM)

    def mknod(self, path: str, mode: int, dev: int) -> int:
        raise mfusepy.FuseOSError(errno.EPERM)

    # -- files ---------------------------------------------------------------------------------------

    def create(self, path: str, mode: int, fi: int | None = None) -> int:
        flags = _backing_flags(fi or os.O_WRONLY)
        with self._mutex:
            self._check()
            existed = os.path.lexists(self._real(path))
            if existed:
                return self._open_locked(path, flags | os.O_CREAT)
            fd = os.open(self._real(path), flags | os.O_CREAT, mode)
            self.handles[fd] = self.disk.create(path, False, mode & 0o7777)
            return fd

    def open(self, path: str, flags: int) -> int:
        with self._mutex:
            self._check()
            return self._open_locked(path, _backing_flags(flags))

    def _open_locked(self, path: str, flags: int) -> int:
        node = self.disk.lookup(path)
        if flags & os.O_TRUNC:
            self.disk.keep_old_bytes(node, self._read_all(path))
            old = os.lstat(self._real(path)).st_size
            fd = os.open(self._real(path), flags)
            self.disk.truncated(node, old, 0)
        else:
            fd = os.open(self._real(path), flags)
        self.handles[fd] = node
        return fd

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        self._check()
        return os.pread(fh, size, offset)

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        with self._mutex:
            self._check()
            node = self.handles[fh]
            self.disk.keep_old_bytes(node, lambda: _read_fd(fh))
            n = os.pwrite(fh, data, offset)
            self.disk.wrote(node, offset, n)
            return n

    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        with self._mutex:
            self._check()
            node = self.handles[fh] if fh is not None and fh in self.handles else self.disk.lookup(path)
            if fh is not None and fh in self.handles:
                self.disk.keep_old_bytes(node, lambda: _read_fd(fh))
                old = os.fstat(fh).st_size
                os.ftruncate(fh, length)
            else:
                self.disk.keep_old_bytes(node, self._read_all(path))
                old = os.lstat(self._real(path)).st_size
                os.truncate(self._real(path), length)
            self.disk.truncated(node, old, length)
        return 0

    def fsync(self, path: str, datasync: int, fh: int) -> int:
        with self._mutex:
            self._check()
            self.disk.fsync(self.handles[fh], os.fstat(fh).st_size, lambda off, n: os.pread(fh, n, off))
        return 0

    def flush(self, path: str, fh: int) -> int:
        self._check()
        return 0

    def release(self, path: str, fh: int) -> int:
        with self._mutex:
            self.handles.pop(fh, None)
            os.close(fh)
        return 0


def _backing_flags(flags: int) -> int:
    """Open backing files read-write (fsync reads back what became durable) and without O_APPEND
    (the kernel already turned appends into absolute offsets)."""
    if flags & os.O_ACCMODE == os.O_WRONLY:
        flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
    return flags & ~os.O_APPEND


def _read_fd(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    return os.pread(fd, size, 0) if size else b""


def _unmount(mountpoint: Path) -> None:
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    cmd = [tool, "-u", "-z", str(mountpoint)] if tool else ["umount", "-l", str(mountpoint)]
    subprocess.run(cmd, capture_output=True, check=False)


def main(argv: list[str]) -> int:
    backing, mountpoint = Path(argv[0]).resolve(), Path(argv[1]).resolve()
    fs = PowerLossFs(backing, mountpoint)
    mfusepy.FUSE(fs, str(mountpoint), foreground=True, fsname="lazyfs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
