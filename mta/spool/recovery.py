"""Start-up recovery of the spool: what a crash or power cut left, sorted into keep, drop, quarantine.

Two steps (issue 18, PERF-4: listening within seconds even with 1,000,000 messages queued):
1. `before_listening`: what must happen before any listener accepts mail, quick whatever the
   spool holds: under the writers' lock, remove tmp/ debris (half-written files of a crash; a
   listener's would be removed too, were it already writing).
2. `scan`: read every envelope in msg/, in the background while new mail flows (`mta serve` runs it
   as a low-priority process, `python -m mta.spool.recovery`, and schedules what it reports).

Per queue id, by the files msg/ holds (see store.py for the formats):
    <id>.msg [+ <id>.json]   a committed message (current format): resumed
    <id>.json + <id>.eml     a committed message (old format, two files): resumed
    <id>.eml alone           data whose envelope never landed: never acknowledged, removed
    <id>.json alone          the state left behind by an interrupted removal: removed
An envelope that does not parse, or a <id>.msg shorter than its length line says (torn by a
power cut), sends every file of the message to corrupt/ for the operator; never deleted silently.

Why the scan is safe beside running listeners, `sendmail` and deliveries: new files appear in msg/
only by an atomic rename of a complete file (flushed, or backed by the journal until a checkpoint
flushes it; torn ones were restored by the replay before listening), so the scan may meet them
and treats them as normal messages (the scheduler keeps it from scheduling any twice, mta.scheduler). The scan
deletes a lone <id>.json or <id>.eml only after checking again, right before, that its partner is
still missing: a message being removed by a delivery is such a pair for a moment, and nothing
writes a partner after the fact. A file that vanishes mid-read was delivered meanwhile: skipped.
A torn <id>.msg the scan meets is therefore always one from before this start (a file renamed
into place but cut short by a power cut on a disk that lied about its flush, or with the
MTA_UNSAFE_SKIP_FSYNC test hook): never acknowledged unless the disk lied, quarantined as before.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from mta.errors import CorruptEntry, SpoolError
from mta.spool.files import fsync_dir
from mta.spool.state import MessageMeta

if TYPE_CHECKING:
    from mta.spool.store import SpoolStore

log = logging.getLogger("mta.spool")

SCAN_NICE = 10  # the background scan yields the CPU to delivery and submission (PERF-4)
NICE_AFTER = 5000  # ... once it has read this many messages: a small spool is read at full speed

# What `scan` yields: (kind, queue id, detail).
FOUND = "F"  # detail: due time (str of a float)
HELD = "H"  # parked by the operator: counted, not scheduled
CORRUPT = "C"  # moved to corrupt/; detail: why
REMOVED = "R"  # debris removed (lone state or data file, or a finished message); detail: what


def before_listening(store: SpoolStore) -> None:
    """Pre-fork hook: everything that must precede the first listener, and nothing slower.

    Runs with the spool lock held; takes the writers' lock exclusively, so a submission child of a
    killed server or a `sendmail` caught mid-write finishes first and new ones wait until this is
    done. Then the journal replay (PWR-4, journal.py): it restores message files a crash left
    missing or torn before the scan can meet them, and only touches segments no writer holds."""
    with store.writers_excluded():
        for entry in os.scandir(store.tmp):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
        store.replay_journal()


def scan(store: SpoolStore) -> Iterator[tuple[str, str, str]]:
    """Read every message in msg/ once (module rule); yields (kind, id, detail), one per message."""
    msg = store.msg
    for entry in os.scandir(msg):
        qid, _, ext = entry.name.rpartition(".")
        if ext == "msg":
            yield _examine(store, qid)
        elif ext == "json":
            if os.path.exists(msg / f"{qid}.msg"):
                continue  # read through its .msg entry
            if os.path.exists(msg / f"{qid}.eml"):
                yield _examine(store, qid)
                continue
            yield _remove_lone(store, qid, "json", "msg", "eml")
        elif ext == "eml" and not os.path.exists(msg / f"{qid}.json"):
            yield _remove_lone(store, qid, "eml", "json")


def _remove_lone(store: SpoolStore, qid: str, ext: str, *partners: str) -> tuple[str, str, str]:
    if any(os.path.exists(store.msg / f"{qid}.{p}") for p in partners):
        return REMOVED, qid, ""  # its partner is there after all (a listing raced a rename): keep
    what = "data without envelope" if ext == "eml" else "envelope without data"
    log.warning("spool: removing %s %s (never acknowledged or already done)", what, qid)
    with contextlib.suppress(OSError):
        os.unlink(store.msg / f"{qid}.{ext}")
    return REMOVED, qid, what


def _examine(store: SpoolStore, qid: str) -> tuple[str, str, str]:
    try:
        meta = store.load_sync(qid)
        store.check_whole(qid)
    except CorruptEntry as exc:
        # Every file goes along: left alone, the next start would delete the rest as debris.
        log.error("spool: %s; moved to corrupt/ with its data", exc)
        for ext in ("msg", "json", "eml"):
            with contextlib.suppress(OSError):
                os.rename(store.msg / f"{qid}.{ext}", store.corrupt / f"{qid}.{ext}")
        # Flush the new names before any flush of msg/ can make the removal durable alone.
        with contextlib.suppress(OSError):
            fsync_dir(store.corrupt)
        return CORRUPT, qid, str(exc)
    except (SpoolError, OSError):
        return REMOVED, qid, ""  # gone meanwhile: delivered and removed
    if meta.held:
        return HELD, qid, ""
    due = meta.next_due()
    if due is None:
        store._discard(qid)  # every recipient final: only the removal was left to do
        return REMOVED, qid, "finished"
    return FOUND, qid, repr(due)


def recover(store: SpoolStore) -> Iterator[MessageMeta]:
    """Both steps at once, for callers without listeners (tests, tools): every message to resume."""
    before_listening(store)
    for kind, qid, _ in scan(store):
        if kind in (FOUND, HELD):
            with contextlib.suppress(SpoolError, OSError):
                yield store.load_sync(qid)


def _die_with_parent(parent: int) -> None:
    """A scan outliving a SIGKILLed server would race the next one's: die with the parent."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)


def yield_cpu() -> None:
    """Leave the CPU to delivery and submission (PERF-4): SCHED_IDLE where the kernel allows it,
    so the scan runs on what nobody else wants (at 1,100 msg/s of new mail a nice 10 scan still
    took half the rate), else nice. SCHED_IDLE keeps a small share, so the scan still ends on a
    machine that is never idle, only later; its reports are retries, new mail is not waiting."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        return
    except (OSError, AttributeError):
        pass
    with contextlib.suppress(OSError):
        os.nice(SCAN_NICE)


def main(argv: list[str]) -> int:
    """`python -m mta.spool.recovery SPOOL PARENT_PID`: scan, one line per message on stdout."""
    from mta.spool.store import SpoolStore

    root, parent = argv
    _die_with_parent(int(parent))
    log.disabled = True  # the server logs what we report, in its own log format
    out = sys.stdout.buffer
    count = 0
    started = time.monotonic()
    for kind, qid, detail in scan(SpoolStore(root)):
        out.write(f"{kind} {qid} {detail}\n".encode())
        count += 1
        if count == NICE_AFTER:
            yield_cpu()
    out.write(f"END {count} {time.monotonic() - started:.3f}\n".encode())
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
