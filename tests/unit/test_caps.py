"""Connection caps that bound the whole relay when several listener processes share a port
(mta.submission.caps, PERF-5; the caps themselves are issue 10 item 14)."""

from __future__ import annotations

import os

import pytest

from mta.submission.caps import LocalCounts, SharedCounts
from mta.submission.listener import _Limits

pytestmark = pytest.mark.req("PERF-5")


class Conn:
    """Stands in for a RelaySMTP: _Limits only shortens its idle timer under stress."""

    def __init__(self) -> None:
        self.timer: float | None = None

    def shorten_idle_timer(self, seconds: float) -> None:
        self.timer = seconds


def test_rows_add_up_per_client_and_in_total() -> None:
    counts = SharedCounts(3, buckets=64)
    a, b, c = (counts.for_row(i) for i in range(3))
    a.add("127.0.0.1", 1)
    b.add("127.0.0.1", 1)
    c.add("192.0.2.7", 1)
    assert counts.total() == 3
    assert a.of_client("127.0.0.1") == 2 == c.of_client("127.0.0.1")  # every row reads every row
    b.add("127.0.0.1", -1)
    assert counts.of_client("127.0.0.1") == 1 and counts.total() == 2


def test_own_is_the_row_of_the_process_and_the_total_with_one_process() -> None:
    counts = SharedCounts(2)
    first, second = counts.for_row(0), counts.for_row(1)
    first.add("a", 1)
    second.add("b", 1)
    second.add("c", 1)
    assert (first.own(), second.own(), counts.total()) == (1, 2, 3)
    local = LocalCounts()
    local.add("a", 1)
    local.add("b", 1)
    local.add("a", -1)
    assert (local.own(), local.total(), local.of_client("a"), local.of_client("b")) == (1, 1, 0, 1)


def test_a_row_handle_leaves_the_others_row_alone() -> None:
    counts = SharedCounts(2)
    first, second = counts.for_row(0), counts.for_row(1)
    first.add("a", 1)
    second.add("a", 1)
    second.add("a", -1)
    assert first.of_client("a") == 1 and counts.total() == 1


def test_the_counts_are_shared_across_fork() -> None:
    counts = SharedCounts(2)
    pid = os.fork()
    if pid == 0:  # the child counts two connections in its row, as a listener child does
        try:
            child = counts.for_row(1)
            child.add("198.51.100.1", 1)
            child.add("198.51.100.1", 1)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert counts.of_client("198.51.100.1") == 2 and counts.total() == 2


def test_bad_sizes_and_rows_are_refused() -> None:
    with pytest.raises(ValueError):
        SharedCounts(0)
    with pytest.raises(ValueError):
        SharedCounts(2).for_row(2)


def test_issue10_item14_caps_bound_the_relay_not_each_process() -> None:
    """Two processes' limits over one table: a client's connections count wherever the kernel put
    them, and so does the relay's total (the old split gave each process half of each cap)."""
    counts = SharedCounts(2)
    one = _Limits(10, 0.0, per_client=4, shared=counts.for_row(0))
    two = _Limits(10, 0.0, per_client=4, shared=counts.for_row(1))
    conns = [Conn() for _ in range(12)]
    # 3 + 1 connections of one address, all on process one but the last: all 4 are admitted.
    assert [one.admit(conns[i], "127.0.0.9") for i in range(3)] == [None] * 3  # type: ignore[arg-type]
    assert two.admit(conns[3], "127.0.0.9") is None  # type: ignore[arg-type]
    # The fifth is over the cap on either process.
    for limits in (one, two):
        assert "from your address" in (limits.admit(conns[4], "127.0.0.9") or "")  # type: ignore[arg-type]
    # Other addresses fill the relay's 10: the eleventh is refused on both processes.
    for i, limits in enumerate([one, two] * 3):
        assert limits.admit(conns[5 + i], f"10.0.0.{i}") is None  # type: ignore[arg-type]
    assert counts.total() == 10
    # Stress (over 80% of the cap) is the relay's too: process two saw it while holding 4 of 10.
    assert all(isinstance(c, Conn) and c.timer is not None for c in (conns[3], conns[6], conns[8], conns[10]))
    for limits in (one, two):
        assert limits.admit(conns[11], "10.1.1.1") == "421 4.7.0 Too many connections, try again later"  # type: ignore[arg-type]
    # A connection going away makes room again, whichever process held it.
    two.release(conns[3], "127.0.0.9")  # type: ignore[arg-type]
    assert counts.of_client("127.0.0.9") == 3 and counts.total() == 9
    assert one.admit(conns[4], "127.0.0.9") is None  # type: ignore[arg-type]


def test_without_a_table_the_caps_are_the_process_own() -> None:
    limits = _Limits(2, 0.0, per_client=1)
    a, b, c = Conn(), Conn(), Conn()
    assert limits.admit(a, "x") is None  # type: ignore[arg-type]
    assert "from your address" in (limits.admit(b, "x") or "")  # type: ignore[arg-type]
    assert limits.admit(b, "y") is None  # type: ignore[arg-type]
    assert limits.admit(c, "z") == "421 4.7.0 Too many connections, try again later"  # type: ignore[arg-type]
