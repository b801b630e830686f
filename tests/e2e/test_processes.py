"""The submission child process: dies with the parent, is watched by it, reports bind failures."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.support.relay import RelayProcess, base_config, deep_merge, listen_address, write_config


def _config(tmp_path: Path) -> tuple[Path, dict[str, object]]:
    data = deep_merge(base_config(tmp_path), {"dns": {"nameservers": ["127.0.0.9"], "port": 5399, "timeout": "200ms"}})
    return write_config(tmp_path, data), data


def _listening(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=0.5).close()
        return True
    except OSError:
        return False


def test_sigkill_of_parent_takes_the_listener_down(tmp_path: Path) -> None:
    config, data = _config(tmp_path)
    relay = RelayProcess(config, data).start()
    [ev] = relay.wait_event("started")
    child = ev["submission_pid"]
    assert isinstance(child, int) and child != relay.proc.pid  # type: ignore[union-attr]
    relay.kill()
    host, port = listen_address(data)
    deadline = time.monotonic() + 5
    while _listening(host, port) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _listening(host, port)
    # and a restart gets the port back at once
    again = RelayProcess(config, data).start()
    assert again.stop() == 0


def test_child_death_stops_parent_with_status_1(tmp_path: Path) -> None:
    config, data = _config(tmp_path)
    relay = RelayProcess(config, data).start()
    [ev] = relay.wait_event("started")
    os.kill(ev["submission_pid"], signal.SIGKILL)
    assert relay.proc is not None
    assert relay.proc.wait(timeout=30) == 1
    assert "submission process exited unexpectedly" in relay.log_text()


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    config, data = _config(tmp_path)
    host, port = listen_address(data)
    blocker = socket.socket()
    blocker.bind((host, port))
    blocker.listen()
    try:
        out = subprocess.run([sys.executable, "-m", "mta", "serve", "--config", str(config)],
                             capture_output=True, text=True, timeout=60)
    finally:
        blocker.close()
    assert out.returncode == 1
    assert "cannot listen" in out.stderr


def _stop_the_group(tmp_path: Path, sig: signal.Signals) -> None:
    """Start `mta serve` in a process group of its own, wait until it listens, then signal the
    whole group: the stop must be clean (exit 0, no "exited unexpectedly")."""
    config, data = _config(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "mta", "serve", "--config", str(config)],
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        host, port = listen_address(data)
        deadline = time.monotonic() + 10
        while not _listening(host, port) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(proc.pid, sig)
        assert proc.wait(timeout=30) == 0
        assert "exited unexpectedly" not in (proc.stderr.read() if proc.stderr else "")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_ctrl_c_to_the_process_group_exits_zero(tmp_path: Path) -> None:
    """Ctrl-C signals parent and child alike; only the parent acts on it, so the stop is clean."""
    _stop_the_group(tmp_path, signal.SIGINT)


def test_sigterm_to_the_process_group_exits_zero(tmp_path: Path) -> None:
    """systemd's default KillMode (control-group) and `kill -- -PGID` SIGTERM parent and listener
    child at once; the child's exit may be seen before the parent's own handler runs. Each round
    is a clean stop; the old code failed about half of them."""
    for _ in range(3):
        _stop_the_group(tmp_path, signal.SIGTERM)


def test_child_stopped_just_before_the_parent_is_a_clean_stop(tmp_path: Path) -> None:
    """The race made certain: the child gets SIGTERM and is gone 100 ms before the parent's."""
    config, data = _config(tmp_path)
    relay = RelayProcess(config, data).start()
    [ev] = relay.wait_event("started")
    assert relay.proc is not None
    os.kill(ev["submission_pid"], signal.SIGTERM)
    time.sleep(0.1)
    relay.proc.send_signal(signal.SIGTERM)
    assert relay.proc.wait(timeout=30) == 0
    assert "exited unexpectedly" not in relay.log_text()
