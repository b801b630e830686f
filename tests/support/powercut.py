"""Drive tests/support/lazyfs.py: mount, cut the power, remount; and kill a relay like a power cut.

    fs = LazyFs(tmp / "disk", tmp / "mnt").mount()
    ... processes write under fs.mountpoint ...
    fs.cut()        # everything not fsync'ed is gone; the mount is down
    fs.mount()      # the next boot sees what a real disk would hold
    fs.unmount()    # clean shutdown: everything written stays

`fuse_available()` says whether this machine can mount it (tests skip with the reason if not;
CI installs fuse3 via .ci/run, so there it runs).
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def fuse_available() -> str:
    """'' when a lazyfs can be mounted here, else why not."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if not (shutil.which("fusermount3") or shutil.which("fusermount")):
        return "fusermount3 missing (Debian package fuse3)"
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as exc:  # OSError: libfuse itself is missing
        return f"mfusepy unusable: {exc}"
    return ""


def require_fuse() -> None:
    """Skip without FUSE here; under CI (CI set) fail instead, since .ci/run installs it."""
    import pytest

    reason = fuse_available()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI must be able to mount FUSE (.ci/run installs it): {reason}")
        pytest.skip(reason)


class LazyFs:
    def __init__(self, backing: Path, mountpoint: Path) -> None:
        self.backing = backing
        self.mountpoint = mountpoint
        self.log_path = backing.parent / f"{backing.name}.lazyfs.log"
        self.proc: subprocess.Popen[bytes] | None = None
        backing.mkdir(parents=True, exist_ok=True)
        mountpoint.mkdir(parents=True, exist_ok=True)

    def mount(self, timeout: float = 15.0) -> LazyFs:
        assert self.proc is None, "already mounted"
        log = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the child
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.support.lazyfs", str(self.backing),
                                      str(self.mountpoint)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=log, env=env, cwd=REPO)
        log.close()
        line = self._reply(timeout)
        if line != "ready" or not os.path.ismount(self.mountpoint):
            self._kill()
            raise AssertionError(f"lazyfs did not mount ({line!r}):\n{self.log_text()[-3000:]}")
        return self

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _send(self, line: str) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def _reply(self, timeout: float) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return ""
        return self.proc.stdout.readline().decode(errors="replace").strip()

    def stats(self) -> str:
        self._send("stats")
        return self._reply(10.0)

    def freeze_and_cut(self, writeback: float = 0.0, seed: int = 0) -> str:
        """The instant of the power cut: the mount stops working (EIO) and the backing folder
        becomes the durable view. The mount stays until unmount(): kill its users first."""
        self._send(f"cut {writeback} {seed}")
        line = self._reply(60.0)
        if not line.startswith("cut"):
            raise AssertionError(f"lazyfs did not cut ({line!r}):\n{self.log_text()[-3000:]}")
        return line

    def cut(self, writeback: float = 0.0, seed: int = 0) -> str:
        line = self.freeze_and_cut(writeback, seed)
        self.unmount()
        return line

    def unmount(self, timeout: float = 15.0) -> None:
        if self.proc is None:
            return
        assert self.proc.stdin is not None
        with contextlib.suppress(OSError):
            self.proc.stdin.close()  # the file system unmounts itself at end of input
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._kill()
        self._force_unmount()
        self.proc = None

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._force_unmount()
        self.proc = None

    def _force_unmount(self) -> None:
        if os.path.ismount(self.mountpoint):
            tool = shutil.which("fusermount3") or shutil.which("fusermount")
            cmd = [tool, "-u", "-z", str(self.mountpoint)] if tool else ["umount", "-l", str(self.mountpoint)]
            subprocess.run(cmd, capture_output=True, check=False)

    def __enter__(self) -> LazyFs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unmount()


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (the listener child of `mta serve`, see mta/submission/process.py)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def stop_all(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """SIGSTOP a process and its descendants and wait until they stand still: the CPU side of a
    power cut. File operations already handed to the file system finish first (they happened
    before the cut); nothing after that reaches the disk or the network."""
    if proc.poll() is not None:
        return
    pids = [proc.pid, *descendants(proc.pid)]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    for pid in pids:
        while time.monotonic() < deadline and _state(pid) not in ("T", "Z", ""):
            time.sleep(0.005)


def kill_all(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGKILL a process and all its descendants at once (as a power cut stops them), and wait."""
    if proc.poll() is not None:
        return
    pids = descendants(proc.pid)
    for pid in [proc.pid, *pids]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=timeout)
    deadline = time.monotonic() + timeout
    for pid in pids:
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.01)


def _alive(pid: int) -> bool:
    return _state(pid) not in ("Z", "")


def _state(pid: int) -> str:
    """The process state letter from /proc (R, S, D, T, Z, ...); '' when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""
