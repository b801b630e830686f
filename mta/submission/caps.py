"""Connection counts shared by a relay's listener processes, for caps that bound the whole relay.

Rule (PERF-5, issue 10 item 14): `max_connections` and `max_connections_per_client` bound the
relay, not each of its `[submission] processes`. The kernel spreads connections over the
processes by a hash of the client's address and port, so a split cap (each process 1/N of it)
refused a client long before the configured figure: with 4 processes and the default 50 per
client, a client with 20 connections met `421` when 13 of them hashed to one process.

So the parent maps one anonymous shared page per relay before it forks; each process writes only
its own row (no lock: one writer per cell) and reads every row. Row layout: cell 0 = the
process's open connections, cells 1..BUCKETS = its connections per client bucket. A client's
bucket is a CRC of its address; two addresses that share a bucket share a cap, which needs
about `max_connections_per_client` of their connections in that one bucket to matter.

Two processes admitting at the same instant may both see a count one below a cap and both admit:
a cap can be passed by at most one connection per process, which a guard against one address
taking every slot can afford. A dead process leaves its row behind, but a child's death stops
the relay (mta.submission.process).

A relay with one listener process counts in `LocalCounts` instead: the same interface
(`ConnectionCounts`), exact per address. `_Limits` asks either the same questions.
"""

from __future__ import annotations

import copy
import mmap
import zlib
from typing import Protocol

BUCKETS = 1024
_CELL = 4  # bytes: a signed 32-bit count


class ConnectionCounts(Protocol):
    """What the listener's caps read and write (mta.submission.listener._Limits)."""

    def own(self) -> int: ...  # this process's open connections
    def total(self) -> int: ...  # the relay's open connections
    def of_client(self, client: str) -> int: ...  # the relay's open connections from `client`
    def add(self, client: str, delta: int) -> None: ...  # one of ours in (+1) or out (-1)


class LocalCounts:
    """The counts of a relay with one listener process: exact per address, no buckets."""

    def __init__(self) -> None:
        self._total = 0
        self._by_client: dict[str, int] = {}  # no entry at 0

    def own(self) -> int:
        return self._total

    def total(self) -> int:
        return self._total

    def of_client(self, client: str) -> int:
        return self._by_client.get(client, 0)

    def add(self, client: str, delta: int) -> None:
        self._total += delta
        left = self._by_client.get(client, 0) + delta
        if left > 0:
            self._by_client[client] = left
        else:
            self._by_client.pop(client, None)


class SharedCounts:
    """Per-process rows of connection counts in memory shared across fork (see the module rule)."""

    def __init__(self, processes: int, buckets: int = BUCKETS) -> None:
        if processes < 1 or buckets < 1:
            raise ValueError("processes and buckets must be at least 1")
        self.processes = processes
        self.buckets = buckets
        self._width = buckets + 1
        # fileno -1: MAP_SHARED | MAP_ANONYMOUS, zero-filled, inherited by every fork.
        self._map = mmap.mmap(-1, processes * self._width * _CELL)
        self._cells = memoryview(self._map).cast("i")
        self._row = 0

    def for_row(self, index: int) -> SharedCounts:
        """A handle on the same memory that writes row `index` (one per child)."""
        if not 0 <= index < self.processes:
            raise ValueError(f"row {index} out of range 0..{self.processes - 1}")
        handle = copy.copy(self)
        handle._row = index * self._width
        return handle

    def own(self) -> int:
        """Open connections of the process that writes this handle's row."""
        return self._cells[self._row]

    def bucket(self, client: str) -> int:
        return 1 + zlib.crc32(client.encode("utf-8", "surrogateescape")) % self.buckets

    def total(self) -> int:
        """Open connections of the whole relay."""
        cells, width = self._cells, self._width
        return sum(cells[r * width] for r in range(self.processes))

    def of_client(self, client: str) -> int:
        """Open connections of `client`'s bucket, over every process."""
        cells, width, b = self._cells, self._width, self.bucket(client)
        return sum(cells[r * width + b] for r in range(self.processes))

    def add(self, client: str, delta: int) -> None:
        """Count a connection of ours in (+1) or out (-1)."""
        cells, row = self._cells, self._row
        cells[row] += delta
        cells[row + self.bucket(client)] += delta
