"""Issue 10 items 8 and 14 over real sockets: AUTH hashing does not stall other clients, and one
client address (or a slowloris crowd) cannot lock every other client out of the listener."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mta.submission.auth import set_password
from tests.support.submission import RawClient, Server

MSG = b"From: a@src.test\r\nTo: b@dst.test\r\nSubject: hi\r\n\r\nhello\r\n.\r\n"


async def normal_submission(srv: Server, source: str) -> float:
    """Seconds a well-behaved client from `source` needs from connect to its 250 after DATA."""
    t0 = time.monotonic()
    c = await RawClient.connect(srv.host, srv.port, source=source)
    try:
        for line in (b"EHLO ok.test\r\n", b"MAIL FROM:<a@src.test>\r\n", b"RCPT TO:<b@dst.test>\r\n"):
            assert (await c.send(line)).startswith(b"250"), line
        assert (await c.send(b"DATA\r\n")).startswith(b"354")
        reply = await c.send(MSG)
        assert reply.startswith(b"250"), reply
    finally:
        c.close()
    return time.monotonic() - t0


# --- item 8: scrypt off the event loop --------------------------------------------------------------

async def test_issue10_item8_lis_1_clients_served_while_auth_hashing_runs(make_server: Callable[..., Any],
                                                                   tmp_path: Path) -> None:
    users = tmp_path / "users"
    set_password(str(users), "alice", "s3cret")
    srv = await make_server(users_file=str(users), allow_insecure_auth=True, auth_failure_delay="10ms")
    attackers = [await RawClient.connect(srv.host, srv.port, source=f"127.0.0.{100 + i}") for i in range(8)]
    for c in attackers:
        assert (await c.send(b"EHLO brute.test\r\n")).startswith(b"250")
    watcher = await RawClient.connect(srv.host, srv.port, source="127.0.0.99")
    assert (await watcher.send(b"EHLO watch.test\r\n")).startswith(b"250")
    wrong = base64.b64encode(b"\0alice\0guess").decode()
    latencies: list[float] = []
    t0 = time.monotonic()
    for c in attackers:  # 8 scrypt checks (about 0.1 s of CPU each) requested at once
        c.writer.write(f"AUTH PLAIN {wrong}\r\n".encode())
    await asyncio.gather(*(c.writer.drain() for c in attackers))
    storm = asyncio.gather(*(c.reply(timeout=20) for c in attackers))
    while not storm.done():
        s = time.monotonic()
        assert (await watcher.send(b"NOOP\r\n")).startswith(b"250")
        latencies.append(time.monotonic() - s)
        await asyncio.sleep(0.01)
    replies = await storm
    storm_seconds = time.monotonic() - t0
    assert all(r.startswith(b"535") for r in replies), replies
    # On the loop the 8 checks would block it for their whole duration; off it, NOOPs keep flowing.
    assert len(latencies) >= 3, (latencies, storm_seconds)
    assert max(latencies) < max(0.25, storm_seconds / 3), (latencies, storm_seconds)
    for c in [*attackers, watcher]:
        c.close()
    ok = await RawClient.connect(srv.host, srv.port, source="127.0.0.98")
    assert (await ok.send(b"EHLO ok.test\r\n")).startswith(b"250")
    good = base64.b64encode(b"\0alice\0s3cret").decode()
    assert (await ok.send(f"AUTH PLAIN {good}\r\n".encode(), timeout=10)).startswith(b"235")
    ok.close()


# --- item 14: per-client cap and stress-mode idle timeouts -------------------------------------------

async def test_issue10_item14_lis_2_flood_and_slowloris_leave_room_for_others(make_server: Callable[..., Any]) -> None:
    """Defaults (max_connections 200, 50 per client): 300 idle connections from 127.0.0.2 and 50
    slowloris from 127.0.0.3; a normal client from 127.0.0.4 still gets its 250 within seconds."""
    srv = await make_server(idle_timeout="30s")

    async def idle(source: str) -> tuple[bytes, RawClient]:
        c = await RawClient.connect(srv.host, srv.port, source=source, greet=False)
        return await c.reply(timeout=10), c

    flood = await asyncio.gather(*(idle("127.0.0.2") for _ in range(300)))
    loris = await asyncio.gather(*(idle("127.0.0.3") for _ in range(50)))
    try:
        firsts = [r[:9] for r, _ in flood]
        assert firsts.count(b"220 relay") == 50 and firsts.count(b"421 4.7.0") == 250
        assert all(b"from your address" in r for r, _ in flood if r.startswith(b"421"))
        assert all(r.startswith(b"220") for r, _ in loris)
        for _, c in loris:  # half a command, then a byte now and then
            c.writer.write(b"MAIL FROM:<slow")
        assert await normal_submission(srv, "127.0.0.4") < 5
        assert len(srv.accepted) == 1
    finally:
        for _, c in [*flood, *loris]:
            c.close()


async def test_issue10_item14_lis_2_stress_mode_shortens_idle_timeouts(make_server: Callable[..., Any]) -> None:
    """Above 80% of max_connections idle clients are cut after stress_idle_timeout (not idle_timeout),
    so the slots turn over while a flood from many addresses lasts; below it nothing changes."""
    srv = await make_server(max_connections=50, max_connections_per_client=20, idle_timeout="30s",
                            stress_idle_timeout="1s")
    calm = [await RawClient.connect(srv.host, srv.port, source="127.0.0.5") for _ in range(10)]
    await asyncio.sleep(1.5)
    assert srv.listeners.limits.active == 10  # 20% in use: the 30 s timeout holds
    crowd = [await RawClient.connect(srv.host, srv.port, source=f"127.0.0.{6 + i % 2}") for i in range(32)]
    t0 = time.monotonic()
    closed = await asyncio.gather(*(c.closed_within(4) for c in [*calm, *crowd]))
    assert all(closed) and time.monotonic() - t0 < 4.5  # 42 of 50 in use: stressed, cut after about 1 s
    assert await normal_submission(srv, "127.0.0.8") < 5
    for c in [*calm, *crowd]:
        c.close()
