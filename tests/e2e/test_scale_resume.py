"""PERF-4 (issue 18): `mta serve` listens and delivers new mail while a large backlog is still read.

The backlog (20,000 deferred messages, written by mta.testing.backlog in the spool's current
format) lives on tmpfs when the machine has /dev/shm, so writing it takes about a second. To
hold the background scan open for as long as the test needs, one entry of msg/ is a FIFO: the
scan blocks opening it until the test writes garbage into it (which then, like a torn file, goes
to corrupt/). Meanwhile new mail must be accepted, delivered or deferred, each exactly once.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from mta.spool.store import new_id
from mta.testing.backlog import write_backlog
from mta.testing.world import World

pytestmark = pytest.mark.req("PERF-4")
BACKLOG = 20_000


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Path]:
    base = Path("/dev/shm")
    if not (base.is_dir() and os.access(base, os.W_OK)):
        yield tmp_path / "queue"
        return
    root = Path(tempfile.mkdtemp(prefix="mta-perf4-", dir=base))
    try:
        yield root / "queue"
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _release(fifo: Path, timeout: float = 20.0) -> None:
    """Write garbage into the FIFO once the scan has opened it (ENXIO until a reader is there)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError as exc:
            if exc.errno != errno.ENXIO or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    with contextlib.suppress(OSError):
        os.write(fd, b"not a spool file\n")
    os.close(fd)


def test_perf_4_new_mail_flows_while_the_backlog_is_read(world: World, spool: Path) -> None:
    write_backlog(spool, BACKLOG, 500)  # deferred, due in a week
    due_now = write_backlog(spool, 3, 500, due_in=-60, domain="dst.test")  # found by the scan, delivered
    msg = spool / "msg"
    torn = new_id(time.time() - 7200)
    whole = (msg / f"{due_now[0]}.msg").read_bytes()
    (msg / f"{torn}.msg").write_bytes(whole.replace(due_now[0].encode(), torn.encode())[:-40])  # power cut
    fifo = msg / f"{new_id(time.time() - 7200)}.msg"
    os.mkfifo(fifo)

    mx = world.mx_host("mx.dst.test")
    world.domain("dst.test", [(10, "mx.dst.test")])
    world.mx_host("mx.defer.test", rcpt_replies={"carol@defer.test": "451 4.3.0 try later"})
    world.domain("defer.test", [(10, "mx.defer.test")])
    started = time.monotonic()
    relay = world.relay({"queue": {"path": str(spool)}, "delivery": {"retry_intervals": ["1h"]}})
    listening = time.monotonic() - started
    assert listening < 5.0, f"listening took {listening:.1f} s"

    sent = [world.submit(relay, ["bob@dst.test"]) for _ in range(5)]
    deferred = [world.submit(relay, ["carol@defer.test"]) for _ in range(5)]
    # `sendmail` is not kept waiting by the scan (it only waits for the quick step before listening).
    out = subprocess.run([sys.executable, "-m", "mta", "sendmail", "--config", str(relay.config), "bob@dst.test"],
                         input=b"Subject: from cron\n\nhello\n", capture_output=True, timeout=20)
    assert out.returncode == 0, out
    mx.wait_for_messages_blocking(6, timeout=20)
    for qid in sent:
        relay.wait_event("delivered", queue_id=qid, timeout=20)
    for qid in deferred:
        relay.wait_event("deferred", queue_id=qid, timeout=20)
    [ev] = relay.wait_event("started")
    assert ev["resume"] == "running"  # the scan is held at the FIFO ...
    assert not relay.events("resume") or all(e["state"] == "running" for e in relay.events("resume"))

    _release(fifo)  # ... until now
    [done] = relay.wait_event("resume", state="finished", timeout=25)
    assert done["scheduled"] == BACKLOG + 3 and done["corrupt"] == 2 and done["held"] == 0, done
    for qid in due_now:
        relay.wait_event("delivered", queue_id=qid, timeout=20)
    assert sorted(p.name for p in (spool / "corrupt").iterdir()) == sorted([f"{torn}.msg", fifo.name])

    assert relay.stop() == 0
    # Each message exactly once: one delivery per id, one deferral per id, and the scheduler's
    # own count at the stop is the backlog plus the five deferred (no id held twice).
    delivered = Counter(e["queue_id"] for e in relay.events("delivered"))
    assert len(delivered) == 9 and set(delivered.values()) == {1}  # 5 new, 1 sendmail, 3 backlog
    assert set(sent + due_now) <= set(delivered)
    assert Counter(e["queue_id"] for e in relay.events("deferred")) == Counter(deferred)
    assert len(mx.messages) == 9
    [stopping] = relay.events("stopping")
    assert stopping["queued"] == BACKLOG + len(deferred)
    assert sum(1 for e in os.scandir(msg) if e.name.endswith(".msg")) == BACKLOG + len(deferred)


def _scans_of(spool: Path) -> list[int]:
    """Pids of background scans reading `spool` (from /proc)."""
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                cmd = Path(entry.path, "cmdline").read_bytes().split(b"\0")
                if b"mta.spool.recovery" in cmd and str(spool).encode() in cmd:
                    out.append(int(entry.name))
    return out


def test_perf_4_sigkill_during_the_scan_leaves_no_scan_and_loses_nothing(world: World, spool: Path) -> None:
    backlog = write_backlog(spool, 2000, 500)
    fifo = spool / "msg" / f"{new_id(time.time() - 7200)}.msg"
    os.mkfifo(fifo)
    relay = world.relay({"queue": {"path": str(spool)}})
    deadline = time.monotonic() + 10
    while not _scans_of(spool) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _scans_of(spool), "no background scan running"
    relay.kill()  # SIGKILL: the scan dies with the server (PDEATHSIG), never racing the next one
    deadline = time.monotonic() + 5
    while _scans_of(spool) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _scans_of(spool) == []
    os.unlink(fifo)
    again = world.relay({"queue": {"path": str(spool)}}, name="again.toml")
    [done] = again.wait_event("resume", state="finished", timeout=25)
    assert done["scheduled"] == len(backlog) and done["corrupt"] == 0, done
    assert again.stop() == 0
    assert again.events("stopping")[-1]["queued"] == len(backlog)


def test_perf_4_in_process_listeners_resume_in_the_background_too(world: World, spool: Path) -> None:
    backlog = write_backlog(spool, 500, 500)
    due_now = write_backlog(spool, 2, 500, due_in=-60, domain="dst.test")
    mx = world.mx_host("mx.dst.test")
    world.domain("dst.test", [(10, "mx.dst.test")])
    relay = world.relay({"queue": {"path": str(spool)}, "submission": {"separate_process": False}})
    [ev] = relay.wait_event("started")
    assert ev["resume"] == "finished" and ev["queued"] >= len(backlog), ev  # a small spool: read within 5 s
    new = world.submit(relay, ["bob@dst.test"])
    mx.wait_for_messages_blocking(3, timeout=20)
    delivered = Counter(e["queue_id"] for e in relay.wait_event("delivered", count=3))
    assert delivered == Counter([*due_now, new])
