"""The log writer thread (mta.log.ThreadedStderr): a slow stderr reader never stalls the caller,
nothing queued is lost at exit or before os._exit, order is kept, and a forked child logs too.

Each case runs a small Python program in a subprocess, since the writer owns fd 2.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
import textwrap
import time

PRELUDE = textwrap.dedent("""
    import os, sys, time
    from mta import log
    log.configure("json", "info")
""")


def _run(body: str, **kw: object) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", PRELUDE + textwrap.dedent(body)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **kw)  # type: ignore[call-overload]


def _events(stderr: bytes) -> list[dict]:
    return [json.loads(line) for line in stderr.decode().splitlines() if line.startswith("{")]


def test_a_reader_that_stops_reading_does_not_stall_the_logging_code() -> None:
    # 2,000 lines of ~1 KB are far more than a pipe holds (64 KiB): written by the caller, the
    # loop would block until the test reads stderr, and "logged" would never come first.
    proc = _run("""
        t = time.monotonic()
        for i in range(2000):
            log.event("delivered", queue_id=f"Q{i:05d}", reply="250 " + "x" * 900)
        print(f"logged {time.monotonic() - t:.3f}", flush=True)
    """)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        assert ready, "the logging loop blocked on a stderr nobody read"
        line = proc.stdout.readline().decode()
        assert line.startswith("logged "), line
        err = proc.stderr.read()  # now read: the writer thread finishes, atexit drains
        assert proc.wait(20) == 0
    finally:
        proc.kill()
    ids = [e["queue_id"] for e in _events(err)]
    assert ids == [f"Q{i:05d}" for i in range(2000)]  # all of them, in order


def test_lines_queued_before_os_exit_are_written_when_drained() -> None:
    proc = _run("""
        for i in range(500):
            log.event("accepted", queue_id=f"Q{i}")
        log.drain()
        os._exit(0)
    """)
    _out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert [e["queue_id"] for e in _events(err)] == [f"Q{i}" for i in range(500)]


def test_a_forked_child_logs_through_its_own_writer_and_the_parent_keeps_its_lines() -> None:
    proc = _run("""
        for i in range(50):
            log.event("accepted", queue_id=f"P{i}")
        pid = os.fork()
        if pid == 0:
            for i in range(50):
                log.event("accepted", queue_id=f"C{i}")
            log.drain()
            os._exit(0)
        os.waitpid(pid, 0)
        log.event("accepted", queue_id="P-after")
    """)
    _out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    ids = [e["queue_id"] for e in _events(err)]
    assert [i for i in ids if i.startswith("C")] == [f"C{i}" for i in range(50)]
    assert [i for i in ids if i.startswith("P")] == [*(f"P{i}" for i in range(50)), "P-after"]
    assert len(ids) == 101  # nothing written twice (the child does not write the parent's queue)


def test_text_format_and_plain_log_records_go_through_the_writer_too() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent("""
            import logging
            from mta import log
            log.configure("text", "info")
            logging.getLogger("mta.x").error("plain %s", "record")
            log.event("bounced", queue_id="Q1", recipient="a@b.example", reply="550 no")
        """)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _out, err = proc.communicate(timeout=20)
    lines = err.decode().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].endswith("mta[error]: plain record")
    assert "mta[bounced]: Q1: to=<a@b.example>, (550 no)" in lines[1]


def test_a_closed_stderr_does_not_hang_or_crash_the_process() -> None:
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", PRELUDE + "for i in range(100): log.event('accepted')\n"
                             "print('ok', flush=True)"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    proc.stderr.close()  # the reader went away: writes fail with EPIPE
    out, _ = proc.communicate(timeout=20)
    assert out.strip() == b"ok"
    assert proc.returncode == 0
    assert time.monotonic() - start < 15
