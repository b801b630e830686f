"""Far-future queue entries, packed: what keeps 1,000,000 deferred messages small (issue 18, PERF-4).

Rule: an entry of the scheduler's heap costs about 200 bytes (a tuple, a float, a 21-character
str and a dict slot, measured with tracemalloc). Deferred messages are mostly due hours or days
ahead, so those go here instead: per bucket of GRANULE seconds of due time, an array('d') of due
times and a bytearray of 11-byte packed ids, 19 bytes per message and no Python object per
message. The scheduler moves a bucket's entries back into its heap shortly before they fall
due (`take`), so the heap only ever holds what is due soon.

Only ids of the canonical shape (mta.spool.store.new_id: 21 upper-case hex digits) are packed;
the scheduler keeps any other id in its heap. Pure data structure: no clock, no I/O.
"""

from __future__ import annotations

import heapq
import re
from array import array
from collections.abc import Iterator

GRANULE = 60.0  # seconds of due time per bucket
_ID = re.compile(r"[0-9A-F]{21}")
_W = 11  # bytes per packed id: "0" + 21 hex digits = 22 hex digits


def packable(qid: str) -> bool:
    return _ID.fullmatch(qid) is not None


def _pack(qid: str) -> bytes:
    return bytes.fromhex("0" + qid)


def _unpack(raw: bytes | bytearray) -> str:
    return raw.hex().upper()[1:]


class _Bucket:
    __slots__ = ("dues", "ids", "oldest")

    def __init__(self) -> None:
        self.dues = array("d")
        self.ids = bytearray()
        self.oldest: bytes | None = None  # smallest packed id (ids sort by arrival); None: recompute

    def find(self, key: bytes) -> int:
        """Index of `key`, or -1 (C-speed search; a hit must sit on an entry boundary)."""
        pos = self.ids.find(key)
        while pos >= 0 and pos % _W:
            pos = self.ids.find(key, pos + 1)
        return -1 if pos < 0 else pos // _W

    def remove_at(self, i: int) -> None:
        """Drop entry i by moving the last one into its place (order within a bucket is free)."""
        last = len(self.dues) - 1
        if i != last:
            self.dues[i] = self.dues[last]
            self.ids[i * _W:(i + 1) * _W] = self.ids[last * _W:]
        del self.dues[last]
        del self.ids[last * _W:]
        self.oldest = None

    def min_id(self) -> bytes | None:
        if self.oldest is None and self.dues:
            self.oldest = min(bytes(self.ids[i:i + _W]) for i in range(0, len(self.ids), _W))
        return self.oldest


class FarQueue:
    """Packed (due, id) entries by bucket; `take` hands back those of the earliest buckets."""

    def __init__(self) -> None:
        self._buckets: dict[int, _Bucket] = {}
        self._keys: list[int] = []  # heap of bucket numbers present in _buckets
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def add(self, qid: str, due: float) -> None:
        """Store a packable id (see packable) due at `due`."""
        key = int(due // GRANULE)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket()
            heapq.heappush(self._keys, key)
        raw = _pack(qid)
        bucket.dues.append(due)
        bucket.ids += raw
        if len(bucket.dues) == 1 or (bucket.oldest is not None and raw < bucket.oldest):
            bucket.oldest = raw
        self.count += 1

    def next_time(self) -> float | None:
        """Start of the earliest bucket (every entry in it is due at or after this), or None."""
        return self._keys[0] * GRANULE if self._keys else None

    def take(self, until: float, limit: int) -> list[tuple[float, str]]:
        """Up to `limit` entries of the buckets starting at or before `until`, earliest bucket first."""
        out: list[tuple[float, str]] = []
        while self._keys and self._keys[0] * GRANULE <= until and len(out) < limit:
            key = self._keys[0]
            bucket = self._buckets[key]
            n = min(limit - len(out), len(bucket.dues))
            start = len(bucket.dues) - n
            ids = bucket.ids
            out.extend((bucket.dues[start + j], _unpack(ids[(start + j) * _W:(start + j + 1) * _W]))
                       for j in range(n))
            del bucket.dues[start:]
            del ids[start * _W:]
            self.count -= n
            if bucket.dues:
                bucket.oldest = None
            else:
                heapq.heappop(self._keys)
                del self._buckets[key]
        return out

    def discard(self, qid: str) -> bool:
        """Remove every entry of `qid` (an operator request about one message); O(size), in C."""
        if not packable(qid):
            return False
        key = _pack(qid)
        found = False
        for number in list(self._buckets):
            bucket = self._buckets[number]
            while (i := bucket.find(key)) >= 0:
                bucket.remove_at(i)
                self.count -= 1
                found = True
            if not bucket.dues:
                del self._buckets[number]
                self._keys.remove(number)
                heapq.heapify(self._keys)
        return found

    def clear(self) -> list[str]:
        """Empty the store; returns every id it held."""
        ids = list(self.ids())
        self._buckets.clear()
        self._keys.clear()
        self.count = 0
        return ids

    def ids(self) -> Iterator[str]:
        for bucket in self._buckets.values():
            raw = bytes(bucket.ids)
            for i in range(0, len(raw), _W):
                yield _unpack(raw[i:i + _W])

    def items(self) -> Iterator[tuple[str, float]]:
        for bucket in self._buckets.values():
            raw = bytes(bucket.ids)
            for j, due in enumerate(bucket.dues):
                yield _unpack(raw[j * _W:(j + 1) * _W]), due

    def counts(self, now: float) -> tuple[int, int]:
        """(entries of buckets already started, entries of later buckets): due vs deferred, to
        within one GRANULE (entries are normally taken back long before they are due)."""
        started = sum(len(b.dues) for k, b in self._buckets.items() if k * GRANULE <= now)
        return started, self.count - started

    def oldest(self) -> str | None:
        """The smallest id held (the earliest arrival), or None when empty."""
        best: bytes | None = None
        for bucket in self._buckets.values():
            low = bucket.min_id()
            if low is not None and (best is None or low < best):
                best = low
        return None if best is None else _unpack(best)
