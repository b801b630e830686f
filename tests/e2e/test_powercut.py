"""Power loss, not just process death: `mta serve` on the power-loss file system (issue 17).

Spool, MTA-STS policy cache and TLS-RPT database live on tests/support/lazyfs.py; at random
moments the power is cut (everything not fsync'ed is gone) and both relay processes are killed;
the relay restarts on what a real disk would hold. Every message that got a 250 must arrive.

The controls run the same with the spool's flushes switched off (MTA_UNSAFE_SKIP_FSYNC, a test
hook in mta/spool/store.py): the test must then report lost mail, which proves it can fail. A
change to the spool's flush pattern (fewer flushes per message) is judged by these tests.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.powercut import require_fuse
from tests.support.soak import run_soak


@pytest.mark.parametrize("group_commit", [True, False], ids=["journal", "file-per-message"])
def test_pwr_1_power_cuts_lose_nothing_acknowledged(tmp_path: Path, group_commit: bool) -> None:
    """Both flush patterns of a submission (issue 18): the group-commit journal (the default) and
    a flush per message (`[queue] group_commit = false`, and the path of sendmail and DSNs)."""
    require_fuse()
    result = run_soak(tmp_path, rounds=2, seed=5, clients=6, round_seconds=1.0, min_acks=15, powercut=True,
                      drain_timeout=20, group_commit=group_commit)
    print(result.line())
    assert result.acked > 20, result.line()
    assert result.lost == 0, f"{result.line()} lost ids: {result.lost_ids}"
    assert result.delivered == result.acked
    assert result.unexplained_duplicates == 0, result.line()  # twice only across a cut
    assert result.corrupt == []  # every state file was flushed before it was renamed into place
    assert result.leftovers == []


def test_pwr_1_control_without_directory_fsync_the_test_reports_losses(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    require_fuse()
    monkeypatch.setenv("MTA_UNSAFE_SKIP_FSYNC", "dir")  # inherited by `mta serve`
    result = run_soak(tmp_path, rounds=1, seed=7, clients=6, round_seconds=1.2, min_acks=20, powercut=True,
                      drain_timeout=20)
    print(result.line())
    assert result.acked > 10, result.line()
    assert result.lost > 0, f"a spool without directory fsync must lose mail here: {result.line()}"


def test_pwr_2_control_without_file_fsync_torn_state_goes_to_corrupt(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Names durable, data not: the cut leaves empty or torn message files. Start-up must move them
    (with any state file) to corrupt/ and keep running: every lost message is there, none is silently gone."""
    require_fuse()
    monkeypatch.setenv("MTA_UNSAFE_SKIP_FSYNC", "file")
    # The flush-per-message path: there each name is made durable per message, so the torn data
    # is what remains (the journal path makes no name durable before its flush: see below).
    result = run_soak(tmp_path, rounds=1, seed=7, clients=6, round_seconds=1.2, min_acks=20, powercut=True,
                      drain_timeout=20, group_commit=False)
    print(result.line())
    assert result.lost > 0, f"a spool without file fsync must lose mail here: {result.line()}"
    # The data (<id>.msg since issue 18; <id>.eml in the old format) is in corrupt/ for each one.
    with_data = {name.rsplit(".", 1)[0] for name in result.corrupt if name.endswith((".msg", ".eml"))}
    assert set(result.lost_ids) <= with_data, "an acknowledged message vanished without a trace"
    stems = {name.rsplit(".", 1)[0] for name in result.corrupt}
    assert stems <= with_data  # no state file was quarantined without its data


def test_pwr_4_control_journal_without_its_flush_the_test_reports_losses(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Group commit (issue 18): skip the journal's fdatasync (and every file flush) and the 250s it
    backs must be lost here; with the flush, test_pwr_1[journal] loses nothing."""
    require_fuse()
    monkeypatch.setenv("MTA_UNSAFE_SKIP_FSYNC", "file")
    result = run_soak(tmp_path, rounds=1, seed=7, clients=6, round_seconds=1.2, min_acks=20, powercut=True,
                      drain_timeout=20, group_commit=True)
    print(result.line())
    assert result.acked > 10, result.line()
    assert result.lost > 0, f"a journal without its flush must lose mail here: {result.line()}"
