"""`[submission] processes = N`: N listener processes on one port (SO_REUSEPORT), PERF-5.

Real `mta serve` runs: both children take connections and mail, their counts add up in the
parent's /metrics, a SIGKILLed child stops the relay (exit 1) without losing acknowledged mail,
SIGTERM stops every child, a second relay cannot join the port, and the key is validated.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mta.submission.sockets import foreign_listeners, parse_listeners
from mta.testing.relay import (
    RelayProcess,
    base_config,
    deep_merge,
    dump_toml,
    free_port,
    listen_address,
    run_cli,
    write_config,
)
from tests.support.burst import burst
from tests.support.ops import scrape, value, wait_up, wait_value
from tests.support.world import World

pytestmark = pytest.mark.req("PERF-5")

MSG = b"Subject: cores\r\n\r\n" + (b"x" * 78 + b"\r\n") * 10


def _established_by(pid: int, port: int) -> int:
    """Established TCP connections on local `port` whose socket `pid` holds (from /proc)."""
    inodes = set()
    with_fds = Path(f"/proc/{pid}/fd")
    for fd in with_fds.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        m = re.fullmatch(r"socket:\[(\d+)\]", target)
        if m:
            inodes.add(int(m.group(1)))
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if f[3] == "01" and int(f[1].split(":")[1], 16) == port and int(f[9]) in inodes:
            count += 1
    return count


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie is gone for our purpose (its parent exited or has not reaped it yet).
    return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"


def test_perf_5_two_children_share_the_port_and_their_counts_add_up(world: World) -> None:
    world.mx_host("mx.dst.test", "127.0.0.26")
    world.domain("dst.test", [(10, "mx.dst.test")])
    # The default cap of 50 per client bounds the relay, not each child: 40 fit wherever they land.
    data = world.config(submission={"listen": [f"127.0.0.1:{free_port()}"], "processes": 2},
                        http={"listen": f"127.0.0.1:{free_port()}"})
    relay = world.relay(data)
    [started] = relay.wait_event("started")
    pids = started["submission_pids"]
    assert len(pids) == 2 and started["submission_pid"] == pids[0]
    assert relay.proc is not None and relay.proc.pid not in pids
    base = f"http://{data['http']['listen']}"
    wait_up(base)
    host, port = listen_address(data)
    listener = f"smtp:{port}"
    wait_value(base, "mta_smtp_connections", 0, listener=listener)
    before = value(scrape(base), "mta_messages_received_total", listener=listener)
    # 40 open sessions: the kernel's hash of the client port puts some on each child (all on one:
    # a chance of 2**-39). Each child holds the server side of the ones it took.
    clients = [smtplib.SMTP(host, port, timeout=10) for _ in range(40)]
    try:
        for c in clients:
            assert c.ehlo()[0] == 250
        per_child = {pid: _established_by(pid, port) for pid in pids}
        assert sum(per_child.values()) == 40 and all(per_child.values()), per_child
        wait_value(base, "mta_smtp_connections", 40, listener=listener)  # summed over both children
        for i, c in enumerate(clients):
            c.sendmail("alice@src.test", [f"u{i}@dst.test"], MSG)
    finally:
        for c in clients:
            c.quit()
    wait_value(base, "mta_messages_received_total", before + 40, listener=listener)
    world.mxs["mx.dst.test"].wait_for_messages(40, timeout=20)  # type: ignore[attr-defined]
    assert relay.stop() == 0


@pytest.mark.req("PERF-5")
def test_issue10_item14_the_per_client_cap_counts_over_every_child(world: World) -> None:
    """8 connections from one address under a cap of 8 on 4 children: all are served and the ninth
    gets the 421, wherever the kernel put them. When each child held a quarter of the cap (2),
    8 connections were refused early unless they happened to land exactly 2 per child (4%)."""
    data = world.config(submission={"listen": [f"127.0.0.1:{free_port()}"], "processes": 4,
                                    "max_connections_per_client": 8})
    relay = world.relay(data)
    [started] = relay.wait_event("started")
    host, port = listen_address(data)
    clients: list[socket.socket] = []
    try:
        for _ in range(8):
            sock = socket.create_connection((host, port), timeout=10)
            clients.append(sock)
            assert sock.recv(512).startswith(b"220"), "a connection under the cap was refused"
        landed = [_established_by(pid, port) for pid in started["submission_pids"]]
        assert sum(landed) == 8, landed
        extra = socket.create_connection((host, port), timeout=10)
        clients.append(extra)
        assert extra.recv(512).startswith(b"421 4.7.0 Too many connections from your address")
        clients.pop(0).close()  # one leaves: its place is free again, on whichever child
        served = False
        deadline = time.monotonic() + 10
        while not served and time.monotonic() < deadline:
            again = socket.create_connection((host, port), timeout=10)
            clients.append(again)
            served = again.recv(512).startswith(b"220")
            if not served:
                time.sleep(0.05)  # the child may not have seen the close yet
        assert served, "the freed place was not given to the next connection"
        assert _established_by_all(started, port) == 8
    finally:
        for sock in clients:
            sock.close()
    assert relay.stop() == 0


def _established_by_all(started: dict[str, object], port: int) -> int:
    pids = started["submission_pids"]
    assert isinstance(pids, list)
    return sum(_established_by(pid, port) for pid in pids)


def test_perf_5_sigkill_of_one_child_stops_the_relay_and_loses_nothing(world: World) -> None:
    mx = world.mx_host("mx.dst.test", "127.0.0.27")
    world.domain("dst.test", [(10, "mx.dst.test")])
    data = world.config(submission={"listen": [f"127.0.0.1:{free_port()}"], "processes": 2})
    relay = world.relay(data)
    [started] = relay.wait_event("started")
    host, port = listen_address(data)
    acked: list[str] = []

    async def load_then_kill() -> None:
        task = asyncio.ensure_future(burst(host, port, acked, time.monotonic() + 2.0,
                                           message=MSG, clients=8, sender="alice@src.test"))
        await asyncio.sleep(0.8)
        os.kill(started["submission_pids"][1], signal.SIGKILL)
        await task

    asyncio.run(load_then_kill())
    assert relay.proc is not None
    assert relay.proc.wait(timeout=30) == 1
    assert "submission process exited unexpectedly" in relay.log_text()
    assert all(_gone(pid) for pid in started["submission_pids"])
    assert len(acked) > 20, "the burst should have been acknowledged many times"
    # The restart delivers whatever the stop left in the spool: every acknowledged message arrives.
    again = RelayProcess(relay.config, relay.data).start()
    world.relays.append(again)
    ids = set(acked)
    deadline = time.monotonic() + 20
    while True:
        delivered = {e["queue_id"] for e in relay.events("delivered") + again.events("delivered")}
        if ids <= delivered or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert ids <= delivered, f"{len(ids - delivered)} of {len(ids)} acknowledged messages not delivered"
    assert len(mx.messages) >= len(ids)
    assert again.stop() == 0


def test_perf_5_sigterm_stops_every_child(tmp_path: Path) -> None:
    data = deep_merge(base_config(tmp_path), {"dns": {"nameservers": ["127.0.0.9"], "port": 5399, "timeout": "200ms"},
                                              "submission": {"processes": 3}})
    relay = RelayProcess(write_config(tmp_path, data), data).start()
    [started] = relay.wait_event("started")
    pids = started["submission_pids"]
    assert len(pids) == 3
    assert relay.stop() == 0
    assert all(_gone(pid) for pid in pids)
    assert "exited unexpectedly" not in relay.log_text()
    host, port = listen_address(data)
    with pytest.raises(OSError):
        socket.create_connection((host, port), timeout=0.5).close()


def test_perf_5_a_second_relay_cannot_join_the_port(tmp_path: Path) -> None:
    """SO_REUSEPORT would let another relay of the same user share the port: it must refuse instead."""
    for sub in ("a", "b1", "b2"):
        (tmp_path / sub).mkdir()
    first = deep_merge(base_config(tmp_path / "a"), {"dns": {"nameservers": ["127.0.0.9"], "port": 5399},
                                                     "submission": {"processes": 2}})
    relay = RelayProcess(write_config(tmp_path / "a", first), first).start()
    try:
        seconds = []  # each retries for a few seconds (a killed relay's children may hold the port): in parallel
        for processes in (2, 1):
            other = deep_merge(base_config(tmp_path / f"b{processes}"), {
                "dns": {"nameservers": ["127.0.0.9"], "port": 5399},
                "submission": {"listen": first["submission"]["listen"], "processes": processes}})
            config = write_config(tmp_path / f"b{processes}", other)
            seconds.append(subprocess.Popen([sys.executable, "-m", "mta", "serve", "--config", str(config)],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        for proc in seconds:
            _, err = proc.communicate(timeout=25)
            assert proc.returncode == 1, err
            assert "cannot listen" in err
        assert relay.proc is not None and relay.proc.poll() is None
    finally:
        assert relay.stop() == 0


def test_perf_5_a_foreign_socket_in_the_group_is_detected() -> None:
    """The second guard (mta.submission.sockets): a listener on our port that is not ours is seen."""
    ours = []
    for _ in range(2):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", 0 if not ours else ours[0].getsockname()[1]))
        s.listen()
        ours.append(s)
    port = ours[0].getsockname()[1]
    inodes = [os.fstat(s.fileno()).st_ino for s in ours]
    tables = [(Path("/proc/net/tcp").read_text(), False)]
    try:
        assert foreign_listeners("127.0.0.1", port, inodes, tables) == 0
        intruder = socket.socket()
        intruder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        intruder.bind(("0.0.0.0", port))  # a wildcard address overlaps ours
        intruder.listen()
        try:
            tables = [(Path("/proc/net/tcp").read_text(), False)]
            assert foreign_listeners("127.0.0.1", port, inodes, tables) == 1
            assert foreign_listeners("127.0.0.2", port, inodes, tables) == 1
        finally:
            intruder.close()
    finally:
        for s in ours:
            s.close()


def test_perf_5_proc_net_tcp6_addresses_parse() -> None:
    text = ("  sl  local_address                         remote_address                        st tx_queue rx_queue "
            "tr tm->when retrnsmt   uid  timeout inode\n"
            "   0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 "
            "00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0\n")
    [(addr, port, inode)] = parse_listeners(text, v6=True)
    assert (str(addr), port, inode) == ("::1", 8080, 4242)


def _write_unchecked(tmp: Path, data: dict[str, object]) -> Path:
    path = tmp / "config.toml"
    path.write_text(dump_toml(data) + "\n")  # write_config would refuse it before mta sees it
    return path


@pytest.mark.parametrize("value, message", [
    (0, "must be 1 to 256, got 0"),
    (-2, "must be 1 to 256, got -2"),
    (257, "must be 1 to 256, got 257"),
    ("2", "expected an integer"),
    (True, "expected an integer"),
])
def test_perf_5_processes_key_is_validated(tmp_path: Path, value: object, message: str) -> None:
    data = deep_merge(base_config(tmp_path), {"submission": {"processes": value}})
    out = run_cli(_write_unchecked(tmp_path, data), "check-config")
    assert out.returncode == 1
    assert "submission.processes" in out.stderr and message in out.stderr


def test_perf_5_several_processes_need_the_separate_process(tmp_path: Path) -> None:
    data = deep_merge(base_config(tmp_path), {"submission": {"processes": 2, "separate_process": False}})
    config = _write_unchecked(tmp_path, data)
    for args in (("check-config",), ("serve",)):
        out = run_cli(config, *args)
        assert out.returncode == 1
        assert "submission.processes: more than 1 needs separate_process = true" in out.stderr
    ok = deep_merge(data, {"submission": {"processes": 4, "separate_process": True}})
    assert run_cli(write_config(tmp_path, ok), "check-config").returncode == 0


def test_perf_5_max_connections_bounds_the_relay_not_each_process(tmp_path: Path) -> None:
    """max_connections = 4 with 2 processes: 4 in all, wherever the kernel puts them (the
    processes count in one shared table, mta.submission.caps)."""
    data = deep_merge(base_config(tmp_path), {"dns": {"nameservers": ["127.0.0.9"], "port": 5399},
                                              "submission": {"processes": 2, "max_connections": 4}})
    relay = RelayProcess(write_config(tmp_path, data), data).start()
    host, port = listen_address(data)
    conns = []
    try:
        admitted = 0
        for _ in range(12):
            s = socket.create_connection((host, port), timeout=10)
            conns.append(s)
            greeting = s.makefile("rb").readline()
            admitted += greeting.startswith(b"220")
            assert greeting.startswith((b"220", b"421")), greeting
        assert admitted == 4
    finally:
        for s in conns:
            s.close()
        assert relay.stop() == 0
