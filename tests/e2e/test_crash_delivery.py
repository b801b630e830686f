"""Crash and restart with deliveries in flight: nothing acknowledged is lost (hardening, SMTP-33)."""

from __future__ import annotations

from pathlib import Path

from tests.support.soak import run_soak


def test_smtp_33_sigkill_rounds_lose_nothing_and_leave_no_debris(tmp_path: Path) -> None:
    result = run_soak(tmp_path, rounds=3, seed=11, clients=6, round_seconds=1.2)
    print(result.line())
    assert result.acked > 30
    assert result.lost == 0, result.line()
    assert result.delivered == result.acked
    assert result.leftovers == []  # no orphans or temp files after a clean run
