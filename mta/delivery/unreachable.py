"""Hosts that recently refused or timed out, skipped across messages for a while (SMTP-37).

RFC 5321 §4.5.4.1 asks a sender to remember unreachable hosts, so one dead MX does not cost a
connect timeout for every queued message. This is the pure decision part: no clock and no I/O;
callers pass the time. Keys are (address, port): one dead address of a multihomed MX does not
take its other addresses down with it.

- `mark` after a connection refusal, a connect timeout, an unreachable network or a greeting
  timeout (the host never became an SMTP peer); never after an SMTP reply, which proves the
  host is up.
- `skipped` says whether to skip the host now; an entry lapses after `ttl` seconds.
- `forget` after a successful connection; `clear` when the operator flushes the queue
  (`mta queue flush` overrides the delay, SMTP-37).
- At most `max_entries` hosts are kept; the one marked longest ago goes first, so a flood of
  dead hosts costs bounded memory and only shortens how long the oldest are remembered.
"""

from __future__ import annotations

from collections import OrderedDict

HostKey = tuple[str, int]  # (IP address, port)

DEFAULT_MAX_ENTRIES = 10_000


class UnreachableHosts:
    """A bounded map host -> time until which it is skipped (see the module rules)."""

    def __init__(self, ttl: float, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        if ttl < 0 or max_entries < 1:
            raise ValueError("ttl must be >= 0 and max_entries >= 1")
        self.ttl = ttl
        self.max_entries = max_entries
        self._until: OrderedDict[HostKey, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._until)

    def mark(self, key: HostKey, now: float) -> None:
        if self.ttl == 0:
            return  # disabled
        self._until.pop(key, None)
        self._until[key] = now + self.ttl  # newest last: eviction takes from the front
        while len(self._until) > self.max_entries:
            self._until.popitem(last=False)

    def skipped(self, key: HostKey, now: float) -> bool:
        until = self._until.get(key)
        if until is None:
            return False
        if now >= until:
            del self._until[key]
            return False
        return True

    def remaining(self, key: HostKey, now: float) -> float:
        """Seconds the host stays skipped (0 when it is not)."""
        return max(0.0, self._until.get(key, now) - now)

    def forget(self, key: HostKey) -> None:
        self._until.pop(key, None)

    def clear(self) -> None:
        self._until.clear()
