"""Disk faults under the spool: a full file system, a spool that is a file, a read-only spool.

The spool lives on a small tmpfs (we run as root) mounted under the test's tmp_path and always
unmounted afterwards. What must hold (README "Spool", SMTP-33 durability):
- while the disk is full, submissions get a temporary 452 4.3.1 (never 250, never 5xx) and leave no
  debris in tmp/; every message accepted before is listed by `mta queue list --json` with its data
  file intact; once space is freed, submissions are accepted again;
- a state write (store.update) that fails leaves the previous state, parseable, and the message
  is delivered once space is back;
- submissions stop short of the last SUBMISSION_RESERVE bytes, so state updates and DSNs of mail
  already accepted still fit when clients fill the disk;
- `mta serve` on a spool it cannot use exits 1 with one clear line on stderr.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import smtplib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mta.errors import SpoolError
from mta.model import RecipientStatus
from mta.spool.state import Recipient
from mta.spool.store import SUBMISSION_RESERVE, SpoolStore, make_meta
from tests.support.relay import RelayProcess, base_config, deep_merge, free_port, listen_address, run_cli, write_config
from tests.support.world import World

LINES = b"x" * 76 + b"\r\n"
BODY = b"Subject: kept\r\n\r\n" + LINES * 250  # 19.5 KB in short lines (SMTP-27)


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "2m") -> Iterator[Path]:
    """A tmpfs of `size` at `path` (created), unmounted on the way out whatever happened."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        # Lazy: a relay killed a moment ago may still hold the lock file open.
        subprocess.run(["umount", "-l", str(path)], check=False)


@contextlib.contextmanager
def read_only_bind(source: Path, target: Path) -> Iterator[Path]:
    """`source` visible read-only at `target` (root ignores permission bits, not a read-only mount)."""
    target.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "--bind", str(source), str(target)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {done.stderr.strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], check=True)
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


def fill(folder: Path, leave: int = 0) -> Path:
    """Write a ballast file until the file system is full, then give back `leave` bytes."""
    ballast = folder / "ballast"
    chunk = b"\0" * 65536
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for _ in range(100_000):  # bounded: 6.5 GB, far beyond any tmpfs used here
            try:
                os.write(fd, chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                break
        else:
            raise AssertionError("the file system never filled up")
        if leave:
            os.ftruncate(fd, max(0, os.fstat(fd).st_size - leave))
    finally:
        os.close(fd)
    return ballast


def free_bytes(folder: Path) -> int:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def submit(relay: RelayProcess, body: bytes = BODY, rcpt: str = "bob@dst.test") -> tuple[int, str]:
    """One SMTP transaction; (code, text) of the reply to the end of DATA."""
    host, port = listen_address(relay.data)
    with smtplib.SMTP(host, port, timeout=10) as s:
        s.ehlo()
        s.mail("alice@src.test")
        code, msg = s.rcpt(rcpt)
        assert code == 250, (code, msg)
        code, msg = s.data(body)
        return code, msg.decode()


def queue(relay: RelayProcess) -> list[dict[str, Any]]:
    out = run_cli(relay.config, "queue", "list", "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def unanswered_dns_config(tmp: Path) -> dict[str, Any]:
    """A relay whose DNS never answers (nothing listens): mail stays queued, retried in an hour."""
    return deep_merge(base_config(tmp), {
        "dns": {"nameservers": ["127.0.0.9"], "port": free_port("127.0.0.9"), "timeout": "1s"},
        "delivery": {"retry_intervals": ["1h"]},
    })


def test_smtp_33_full_spool_refuses_with_452_keeps_accepted_mail_and_recovers(tmp_path: Path) -> None:
    """SMTP-33: a full spool answers 452 4.3.1, loses nothing accepted, accepts again when space frees."""
    with tmpfs(tmp_path / "queue") as spool:
        data = unanswered_dns_config(tmp_path)
        relay = RelayProcess(write_config(tmp_path, data), data).start()
        try:
            accepted = []
            for i in range(3):
                code, text = submit(relay, BODY.replace(b"kept", f"kept {i}".encode()))
                assert code == 250, text
                accepted.append(text.rsplit(" ", 1)[-1])
            for qid in accepted:
                relay.wait_event("deferred", queue_id=qid)  # its state has been rewritten once
            ballast = fill(spool)
            for _ in range(2):
                code, text = submit(relay)
                assert (code, text[:5]) == (452, "4.3.1"), (code, text)
            assert os.listdir(spool / "tmp") == []  # the refused writes left no debris
            listed = {m["id"]: m for m in queue(relay)}
            assert sorted(listed) == sorted(accepted)
            store = SpoolStore(spool)
            for i, qid in enumerate(accepted):
                raw = store.read_data_sync(qid)
                assert raw.endswith(b"\r\n\r\n" + LINES * 250) and f"Subject: kept {i}".encode() in raw
                assert listed[qid]["size"] == len(raw)
                assert listed[qid]["recipients"][0]["status"] == "deferred"
            refused = relay.events("refused")
            assert refused and all(e["reason"] == "spool disk is full" for e in refused)
            ballast.unlink()
            code, text = submit(relay)
            assert code == 250, text
            assert len(queue(relay)) == 4
        finally:
            relay.kill()


def test_smtp_33_submissions_leave_a_reserve_for_state_updates(tmp_path: Path) -> None:
    """SMTP-33: with less than SUBMISSION_RESERVE free, clients get 452 but delivery state is still written."""
    with tmpfs(tmp_path / "queue", size="4m") as spool:
        data = deep_merge(unanswered_dns_config(tmp_path), {"delivery": {"retry_intervals": ["1s"]}})
        relay = RelayProcess(write_config(tmp_path, data), data).start()
        try:
            code, text = submit(relay)
            assert code == 250, text
            qid = text.rsplit(" ", 1)[-1]
            fill(spool, leave=SUBMISSION_RESERVE // 2)
            assert 0 < free_bytes(spool) < SUBMISSION_RESERVE
            code, text = submit(relay, b"Subject: small\r\n\r\nhi\r\n")
            assert (code, text[:5]) == (452, "4.3.1"), (code, text)
            # The reserve is for us: retries go on and each one's state is written.
            before = len(relay.wait_event("deferred", queue_id=qid))
            relay.wait_event("deferred", count=before + 1, queue_id=qid, timeout=15)
            assert queue(relay)[0]["recipients"][0]["attempts"] >= before + 1
            assert [e for e in relay.events("log") if e["level"] == "error"] == []
        finally:
            relay.kill()


def test_smtp_33_failed_state_write_keeps_old_state_and_delivery_resumes(world: World) -> None:
    """SMTP-33: disk full while an attempt runs: the state write fails, the old state stays, mail is not lost."""
    mx = world.mx_host("mx.dst.test", "127.0.0.34", stall_at="MAIL")
    world.domain("dst.test", [(10, "mx.dst.test")])
    with tmpfs(world.tmp / "queue") as spool:
        relay = world.relay(world.config(delivery={"command_timeout": "2s", "retry_intervals": ["1h"]}))
        qid = world.submit(relay, ["bob@dst.test"])
        store = SpoolStore(spool)
        before = store.state_bytes(qid)
        deadline = time.monotonic() + 10
        while not mx.saw("MAIL") and time.monotonic() < deadline:  # the attempt is stuck at MAIL now
            time.sleep(0.02)
        assert mx.saw("MAIL")
        ballast = fill(spool)
        # The attempt ends (MAIL timeout) and its state write hits the full disk.
        errors = relay.wait_event("log", timeout=10, level="error")
        assert any(qid in e["message"] for e in errors), errors
        assert store.state_bytes(qid) == before  # the old state, byte for byte
        meta = store.load_sync(qid)
        assert meta.recipients[0].status is RecipientStatus.QUEUED and meta.recipients[0].attempts == 0
        assert store.read_data_sync(qid).endswith(b"hello\r\n")
        assert [p for p in os.listdir(spool / "tmp")] == []
        ballast.unlink()
        mx.stall_at = None
        out = run_cli(relay.config, "queue", "flush")
        assert out.returncode == 0, out.stderr
        [msg] = mx.wait_for_messages_blocking(1, timeout=10)
        assert msg.rcpt_tos == ["bob@dst.test"]
        relay.wait_event("delivered", queue_id=qid)
        relay.stop()


def test_smtp_33_operator_request_on_full_disk_fails_cleanly(tmp_path: Path) -> None:
    """SMTP-33: `mta queue hold` while the spool is full: exit 1 with one line; the server carries on."""
    with tmpfs(tmp_path / "queue") as spool:
        data = unanswered_dns_config(tmp_path)
        relay = RelayProcess(write_config(tmp_path, data), data).start()
        try:
            code, text = submit(relay)
            assert code == 250, text
            qid = text.rsplit(" ", 1)[-1]
            relay.wait_event("deferred", queue_id=qid)
            ballast = fill(spool)
            out = run_cli(relay.config, "queue", "hold", qid)
            assert out.returncode == 1, out
            assert out.stderr.strip().splitlines() == [
                "mta: cannot pass the request to the running server: spool disk is full"], out.stderr
            assert os.listdir(spool / "ctl") == []  # no half request reaches the server
            ballast.unlink()
            assert run_cli(relay.config, "queue", "hold", qid).returncode == 0
            relay.wait_event("held", queue_id=qid, timeout=5)
            assert queue(relay)[0]["held"] is True
        finally:
            relay.kill()


async def test_smtp_33_store_update_on_full_disk_leaves_old_state(tmp_path: Path) -> None:
    """SMTP-33: SpoolStore.update raising on ENOSPC leaves the old meta and no debris in tmp/."""
    with tmpfs(tmp_path / "spool", size="1m") as spool:
        store = SpoolStore(spool)
        store.prepare()
        meta = make_meta(sender="a@src.test", recipients=["b@dst.test"], data=b"hi\r\n", now=1000.0)
        await store.put(meta, b"hi\r\n")
        fill(spool)
        changed = meta.__class__(**{**meta.__dict__, "recipients": (
            Recipient(address="b@dst.test", status=RecipientStatus.DEFERRED, attempts=1,
                      last_error="451 4.4.1 " + "y" * 8000, next_attempt=2000.0),)})
        with pytest.raises(SpoolError, match="spool disk is full"):
            await store.update(changed)
        assert store.load_sync(meta.id) == meta
        assert os.listdir(spool / "tmp") == []
        with pytest.raises(SpoolError, match="spool disk is full"):
            await store.put(make_meta(sender="", recipients=["c@dst.test"], data=b"x" * 9000), b"x" * 9000)
        assert store.ids() == [meta.id] and os.listdir(spool / "tmp") == []


@pytest.mark.parametrize("kind", ["file", "read-only"])
def test_unusable_spool_at_start_exits_1_with_one_line(tmp_path: Path, kind: str) -> None:
    """README "Spool": `mta serve` on a spool that is a file or read-only exits 1, one clear stderr line."""
    spool = tmp_path / "queue"
    data = base_config(tmp_path)
    # MTA-STS on (the default), with its cache inside the spool as in config.example.toml.
    data["mta_sts"] = {"enabled": True, "cache_path": str(spool / "sts-cache.db")}
    config = write_config(tmp_path, data)
    with contextlib.ExitStack() as stack:
        if kind == "file":
            spool.write_text("not a folder\n")
            expected = "not a directory"
        else:
            source = tmp_path / "source"
            source.mkdir()
            stack.enter_context(read_only_bind(source, spool))
            expected = "read-only"
        started = time.monotonic()
        out = run_cli(config, "serve", timeout=15)
        assert time.monotonic() - started < 10
    assert out.returncode == 1, out
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("mta: ") and str(spool) in lines[0] and expected in lines[0].lower(), lines


def test_unusable_spool_queue_commands_fail_cleanly(tmp_path: Path) -> None:
    """README "Spool": queue commands on a spool that is a file fail with one line, exit 1."""
    spool = tmp_path / "queue"
    spool.write_text("not a folder\n")
    config = write_config(tmp_path, base_config(tmp_path))
    for args in (("queue", "list", "--json"), ("queue", "flush")):
        out = run_cli(config, *args)
        assert out.returncode == 1, (args, out)
        assert len(out.stderr.strip().splitlines()) == 1 and "not a directory" in out.stderr, (args, out.stderr)

