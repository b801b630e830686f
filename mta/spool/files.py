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
