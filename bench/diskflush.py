"""Disk flushes (cache-flush requests the block device completed), read from the kernel.

Linux >= 5.5 counts them per device: column 16 of /sys/dev/block/MAJ:MIN/stat (the same columns as
/proc/diskstats without the device numbers and name). An fsync on ext4 costs one (the journal
commit's PREFLUSH, or an explicit flush when its transaction was already committed), so flushes
per message are what a durable spool pays the disk. The counter is per device, shared by every
process on the machine: `Meter` measures the background rate just before the run and subtracts it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

FLUSH_FIELD = 15  # 0-based: reads 0-3, writes 4-7, in flight 8, ticks 9-10, discards 11-14, flushes 15


def device_stat(path: Path) -> Path | None:
    """The stat file of the block device holding `path` (the whole disk if `path` is on a partition)."""
    st = os.stat(path)
    sysdir = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
    if not (sysdir / "stat").exists():
        return None  # tmpfs, overlay without a backing device, ...
    if (sysdir / "partition").exists():
        sysdir = sysdir.resolve().parent  # partitions' flushes are counted on the disk
    return sysdir / "stat"


def flushes(stat_file: Path) -> int | None:
    fields = stat_file.read_text().split()
    return int(fields[FLUSH_FIELD]) if len(fields) > FLUSH_FIELD else None  # older kernels: no column


class Meter:
    """Flushes issued on one device during a run, less the background rate measured before it."""

    def __init__(self, path: Path, background_seconds: float = 2.0) -> None:
        self.stat = device_stat(path)
        self.background_seconds = background_seconds
        self.rate = 0.0
        self._start: int | None = None
        self._t0 = 0.0

    def start(self) -> Meter:
        if self.stat is None or flushes(self.stat) is None:
            return self
        a = flushes(self.stat)
        time.sleep(self.background_seconds)
        b = flushes(self.stat)
        assert a is not None and b is not None
        self.rate = (b - a) / self.background_seconds
        self._start, self._t0 = b, time.monotonic()
        return self

    def stop(self) -> tuple[float | None, float]:
        """(flushes during the run less background, background flushes/s); None when unknown."""
        if self.stat is None or self._start is None:
            return None, 0.0
        end = flushes(self.stat)
        assert end is not None
        raw = end - self._start
        return max(0.0, raw - self.rate * (time.monotonic() - self._t0)), self.rate
