"""The spool's writers' lock: an outside writer (`sendmail`) and start-up recovery never overlap."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from mta.errors import SpoolError
from mta.spool.store import SpoolStore


def test_sendmail_5_writer_waits_while_recovery_holds_the_spool(tmp_path: Path) -> None:
    store = SpoolStore(tmp_path / "queue")
    store.prepare()
    entered: list[float] = []

    def writer() -> None:
        with store.writing(timeout=5):
            entered.append(time.monotonic())

    with store.writers_excluded():
        thread = threading.Thread(target=writer)
        thread.start()
        time.sleep(0.3)
        released = time.monotonic()
        assert entered == []  # still waiting: recovery would otherwise delete its half-written files
    thread.join(5)
    assert entered and entered[0] >= released


def test_sendmail_5_recovery_waits_for_a_writer_then_times_out_clearly(tmp_path: Path) -> None:
    store = SpoolStore(tmp_path / "queue")
    store.prepare()
    with store.writing(), pytest.raises(SpoolError, match="still running"), store.writers_excluded(timeout=0.2):
        pass
    with store.writers_excluded(timeout=0.2), pytest.raises(SpoolError, match="busy"), store.writing(timeout=0.2):
        pass
