"""The background spool scan (PERF-4) gives the CPU away once it is past the first messages:
SCHED_IDLE where the kernel allows it, else a higher nice value."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mta.spool import recovery


@pytest.mark.req("PERF-4")
def test_the_scan_runs_as_sched_idle_or_niced() -> None:
    probe = ("import os; from mta.spool import recovery; before = os.nice(0); recovery.yield_cpu(); "
             "print(os.sched_getscheduler(0) == os.SCHED_IDLE, os.nice(0) - before)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=20, check=True)
    idle, niced = out.stdout.split()
    assert idle == "True" or int(niced) == recovery.SCAN_NICE
    assert os.sched_getscheduler(0) != os.SCHED_IDLE  # the test process itself is untouched
