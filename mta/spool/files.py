"""Small file-level helpers of the spool: directory flushes, locks with a deadline, and OS errors
put in words an operator acts on. Kept apart from store.py so that module stays one sitting.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path

from mta.errors import SpoolError

_NOATIME = getattr(os, "O_NOATIME", 0)


def read_noatime(path: Path) -> bytes:
    """The whole file, read without updating its access time where the kernel lets us.

    With `relatime` the first read of a just-written file updates its atime: an inode change that
    on ext4 waits for the journal whenever a commit is under way (the spool's flushes start them
    all the time). O_NOATIME needs the file's owner (or CAP_FOWNER); elsewhere a plain open.
    """
    global _NOATIME
    try:
        fd = os.open(path, os.O_RDONLY | _NOATIME)
    except PermissionError:
        if not _NOATIME:
            raise
        _NOATIME = 0  # not the owner of the spool's files: plain reads from now on
        fd = os.open(path, os.O_RDONLY)
    try:
        chunks = [os.read(fd, os.fstat(fd).st_size + 1)]
        while chunks[-1]:  # the file grew meanwhile (never for a spool file, but be exact)
            chunks.append(os.read(fd, 1 << 16))
        return b"".join(chunks)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unusable(exc: OSError) -> str:
    """Why a spool folder cannot be used, in words an operator acts on."""
    if exc.errno in (errno.EEXIST, errno.ENOTDIR):
        return "not a directory (a file is in the way)"
    if exc.errno == errno.EROFS:
        return "read-only file system"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "disk is full"
    return str(exc.strerror or exc)


def describe_os_error(exc: OSError) -> str:
    """A spool write failure in words ("spool disk is full" decides 452 over 451 at submission)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "spool disk is full"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "spool is not writable"
    return f"spool write failed: {exc.strerror or exc}"


def flock_within(fd: int, operation: int, timeout: float, busy: str) -> None:
    """Take `operation` (LOCK_EX/LOCK_SH) on `fd`, polling for at most `timeout` s; SpoolError(busy) after."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise SpoolError(busy) from None
            time.sleep(0.02)
