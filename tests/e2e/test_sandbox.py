"""`mta sandbox` as a newcomer runs it (issue 16, KIT-6): a subprocess, its printed swaks lines, one
message per demo domain over SMTP, the printed outcomes, and Ctrl-C (SIGINT) for a clean exit 0."""

from __future__ import annotations

import queue
import re
import signal
import smtplib
import subprocess
import sys
import threading
import time

import pytest


def _reader(proc: subprocess.Popen[str], lines: queue.Queue[str]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.put(line.rstrip("\n"))


def _until(lines: queue.Queue[str], seen: list[str], done: re.Pattern[str], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            continue
        seen.append(line)
        if done.search(line):
            return line
    raise AssertionError(f"no line matching {done.pattern!r} within {timeout}s; output:\n" + "\n".join(seen))


@pytest.mark.req("KIT-6")
def test_sandbox_prints_swaks_lines_and_each_outcome_and_stops_on_sigint() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "mta", "sandbox"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_reader, args=(proc, lines), daemon=True).start()
    seen: list[str] = []
    try:
        head = _until(lines, seen, re.compile(r"relay listening on (127\.0\.0\.1):(\d+)"), 30)
        _until(lines, seen, re.compile(r"Ctrl-C stops"), 5)
        match = re.search(r"on (127\.0\.0\.1):(\d+)", head)
        assert match is not None
        host, port = match.group(1), int(match.group(2))
        swaks = [line for line in seen if line.startswith("swaks ")]
        rcpts = [re.search(r"--to (\S+)", line).group(1) for line in swaks]  # type: ignore[union-attr]
        assert all(f"--server {host}:{port} " in line for line in swaks)
        assert sorted(r.split("@")[1] for r in rcpts) == sorted(
            ["enforce.demo", "wrongcert.demo", "testing.demo", "nopolicy.demo", "nullmx.demo"])

        for rcpt in rcpts:  # what each swaks line sends, with the sender it names
            sender = re.search(r"--from (\S+)", swaks[rcpts.index(rcpt)]).group(1)  # type: ignore[union-attr]
            with smtplib.SMTP(host, port, timeout=10) as smtp:
                assert smtp.sendmail(sender, [rcpt], b"Subject: sandbox\r\n\r\nhello\r\n") == {}

        expected = {
            "enforce": r"^delivered +bob@enforce\.demo via mx1\.enforce\.demo \(TLS TLSv1\.[23], verified, "
                       r"MTA-STS enforce\)",
            "wrongcert": r"^deferred +bob@wrongcert\.demo: 4\.\d+\.\d+ .*(certificate|Hostname)",
            "testing": r"^delivered +bob@testing\.demo via mx1\.testing\.demo \(TLS TLSv1\.[23], not verified, "
                       r"MTA-STS testing\)",
            "nopolicy": r"^delivered +bob@nopolicy\.demo via mx1\.nopolicy\.demo \(TLS none, not verified, "
                        r"no MTA-STS\)",
            "nullmx": r"^bounced +bob@nullmx\.demo: 5\.1\.10 ",
        }
        pending = {name: re.compile(pattern) for name, pattern in expected.items()}
        deadline = time.monotonic() + 25
        while pending and time.monotonic() < deadline:
            line = _until(lines, seen, re.compile(r"^(delivered|deferred|bounced) "), deadline - time.monotonic())
            for name, pattern in list(pending.items()):
                if pattern.search(line):
                    del pending[name]
        assert not pending, f"missing {sorted(pending)}; output:\n" + "\n".join(seen)

        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        assert proc.wait(timeout=20) == 0, "\n".join(seen)
        _until(lines, seen, re.compile(r"mta sandbox: stopped"), 5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
