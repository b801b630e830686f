"""Hostile SMTP clients against the submission listener (hardening issue, part 4), over real sockets.

Each hostile client gets a clear reply (or a closed connection) in bounded time and memory, and the
listener stays healthy: a normal message is accepted afterwards. Items: SMTP-26 (bare LF / CR, no
smuggling), SMTP-27 (long text lines), SMTP-28 (long command lines), plus the listener's own limits
(idle timeout, connection cap, message size).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mta import config
from mta.spool.store import SpoolStore
from mta.submission.handler import SubmissionHandler
from mta.submission.listener import Listeners
from tests.support.pki import TestPki
from tests.support.submission import RawClient, Server

MSG = b"From: a@src.test\r\nTo: b@dst.test\r\nSubject: hi\r\n\r\nhello\r\n"
MB = 1_000_000


class Raw(RawClient):
    """RawClient plus the envelope every hostile-DATA test starts with."""

    @classmethod
    async def open(cls, host: str, port: int, greet: bool = True) -> Raw:
        raw = await cls.connect(host, port, greet=greet)
        assert isinstance(raw, Raw)
        return raw

    async def cmd(self, line: bytes, timeout: float = 5) -> bytes:
        return await self.send(line, timeout)

    async def envelope(self) -> None:
        assert (await self.cmd(b"EHLO client.test\r\n")).startswith(b"250")
        assert (await self.cmd(b"MAIL FROM:<a@src.test>\r\n")).startswith(b"250")
        assert (await self.cmd(b"RCPT TO:<b@dst.test>\r\n")).startswith(b"250")
        assert (await self.cmd(b"DATA\r\n")).startswith(b"354")



async def send_normal_message(srv: Server) -> None:
    """The health check after each attack: a plain message is still accepted and spooled."""
    before = len(srv.accepted)
    c = await Raw.open(srv.host, srv.port)
    try:
        await c.envelope()
        assert (await c.cmd(MSG + b".\r\n")).startswith(b"250 2.0.0")
        assert (await c.cmd(b"QUIT\r\n")).startswith(b"221")
    finally:
        c.close()
    assert len(srv.accepted) == before + 1


def vm_rss() -> int:
    """Resident set size of this process in bytes (/proc/self/status, no psutil)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


# --- long lines (SMTP-27, SMTP-28) ------------------------------------------------------------

async def test_smtp_28_overlong_command_lines_get_500_and_session_continues(make_server: Callable[..., Any]) -> None:
    srv = await make_server()
    c = await Raw.open(srv.host, srv.port)
    try:
        assert (await c.cmd(b"EHLO client.test\r\n")).startswith(b"250")
        # Over the 512-octet command limit but under the reader's line buffer ...
        assert (await c.cmd(b"MAIL FROM:<" + b"a" * 600 + b"@src.test>\r\n")).startswith(b"500")
        # ... and far over it (2 MB, no line end for a long while): drained, not buffered.
        c.writer.write(b"NOOP " + b"x" * (2 * MB))
        assert (await c.cmd(b"\r\n", timeout=10)).startswith(b"500")
        # RFC 5321 §4.5.3.1 limits: local-part 64, domain 255.
        assert (await c.cmd(b"MAIL FROM:<" + b"l" * 65 + b"@src.test>\r\n"))[:1] == b"5"
        assert (await c.cmd(b"MAIL FROM:<a@" + b"d" * 250 + b".test>\r\n"))[:1] == b"5"
        await c.cmd(b"RSET\r\n")
        assert (await c.cmd(b"MAIL FROM:<a@src.test>\r\n")).startswith(b"250")
    finally:
        c.close()
    await send_normal_message(srv)


@pytest.mark.parametrize("where", ["header", "body"])
async def test_smtp_27_overlong_text_line_refused_not_rewrapped(make_server: Callable[..., Any], where: str) -> None:
    """SMTP-27 decision: a line over 1000 octets (header or body) -> 500, nothing spooled."""
    srv = await make_server()
    long = b"X-Long: " + b"h" * 1200 if where == "header" else b"b" * 1200
    msg = (long + b"\r\nSubject: x\r\n\r\nbody\r\n") if where == "header" else (b"Subject: x\r\n\r\n" + long + b"\r\n")
    c = await Raw.open(srv.host, srv.port)
    try:
        await c.envelope()
        assert (await c.cmd(msg + b".\r\n")).startswith(b"500")
        # 998 octets + CRLF is the largest legal line and passes.
        assert (await c.cmd(b"MAIL FROM:<a@src.test>\r\n")).startswith(b"250")
        assert (await c.cmd(b"RCPT TO:<b@dst.test>\r\n")).startswith(b"250")
        assert (await c.cmd(b"DATA\r\n")).startswith(b"354")
        assert (await c.cmd(b"Subject: x\r\n\r\n" + b"y" * 998 + b"\r\n.\r\n")).startswith(b"250")
    finally:
        c.close()
    assert len(srv.accepted) == 1


# --- SMTP smuggling (SMTP-26) -----------------------------------------------------------------

SMUGGLE_ENDS = [b"\n.\n", b"\r.\r", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r", b"\n.\r", b"\r.\n",
                b"\r\n.\r\r\n", b"\r\n\x00.\r\n"]


@pytest.mark.parametrize("fake_end", SMUGGLE_ENDS, ids=[repr(e)[2:-1] for e in SMUGGLE_ENDS])
async def test_smtp_26_no_end_of_data_ambiguity(make_server: Callable[..., Any], fake_end: bytes) -> None:
    """SMTP-26: a non-CRLF `.` line never ends DATA: the smuggled second message stays inside the first,
    exactly one message is spooled, exactly one 250 comes back, and the stored bytes are CRLF-clean."""
    srv = await make_server()
    smuggled = (b"MAIL FROM:<ceo@victim.test>\r\nRCPT TO:<target@dst.test>\r\nDATA\r\n"
                b"Subject: smuggled\r\n\r\nwire money\r\n")
    payload = b"Subject: first\r\n\r\nline1" + fake_end + smuggled + b".\r\nQUIT\r\n"
    c = await Raw.open(srv.host, srv.port)
    try:
        await c.envelope()
        c.writer.write(payload)  # one write: the whole pipelined attack arrives at once
        await c.writer.drain()
        replies = []
        for _ in range(10):  # bounded: a smuggled transaction would add 3 more replies
            r = await c.reply()
            if not r:
                break
            replies.append(r[:3])
            if r.startswith(b"221"):
                break
    finally:
        c.close()
    assert replies == [b"250", b"221"], replies
    assert len(srv.accepted) == 1 and len(srv.store.ids()) == 1
    meta = srv.accepted[0]
    assert meta.sender == "a@src.test" and [r.address for r in meta.recipients] == ["b@dst.test"]
    data = srv.store.read_data_sync(meta.id)
    assert b"\n" not in data.replace(b"\r\n", b"") and b"\r" not in data.replace(b"\r\n", b"")
    assert b"\r\nMAIL FROM:<ceo@victim.test>\r\n" in data and data.endswith(b"wire money\r\n")


async def test_smtp_26_nul_bytes(make_server: Callable[..., Any]) -> None:
    """NUL in an address -> 5xx; a NUL command line -> 500; NUL in the body is kept byte for byte."""
    srv = await make_server()
    c = await Raw.open(srv.host, srv.port)
    try:
        assert (await c.cmd(b"EHLO client.test\r\n")).startswith(b"250")
        assert (await c.cmd(b"\x00\x00\x00\r\n")).startswith(b"500")
        assert (await c.cmd(b"MAIL FROM:<a\x00b@src.test>\r\n"))[:1] == b"5"
        assert (await c.cmd(b"MAIL FROM:<a@src.test>\r\n")).startswith(b"250")
        assert (await c.cmd(b"RCPT TO:<b\x00@dst.test>\r\n"))[:1] == b"5"
        assert (await c.cmd(b"RCPT TO:<x\rb@dst.test>\r\n"))[:1] == b"5"
        assert (await c.cmd(b"RCPT TO:<b@dst.test>\r\n")).startswith(b"250")
        assert (await c.cmd(b"DATA\r\n")).startswith(b"354")
        assert (await c.cmd(b"Subject: nul\r\n\r\na\x00b\r\n.\r\n")).startswith(b"250")
    finally:
        c.close()
    assert srv.store.read_data_sync(srv.accepted[0].id).endswith(b"\r\n\r\na\x00b\r\n")


async def test_helo_cannot_inject_a_header(make_server: Callable[..., Any]) -> None:
    """SMTP-43/26: a bare CR in the EHLO name must not reach the Received: field (header injection)."""
    srv = await make_server()
    c = await Raw.open(srv.host, srv.port)
    try:
        assert (await c.cmd(b"EHLO evil\rBcc: victim@x.test\r\n")).startswith(b"250")
        assert (await c.cmd(b"MAIL FROM:<a@src.test>\r\n")).startswith(b"250")
        assert (await c.cmd(b"RCPT TO:<b@dst.test>\r\n")).startswith(b"250")
        assert (await c.cmd(b"DATA\r\n")).startswith(b"354")
        assert (await c.cmd(MSG + b".\r\n")).startswith(b"250")
    finally:
        c.close()
    data = srv.store.read_data_sync(srv.accepted[0].id)
    head = data.split(b"\r\n\r\n")[0]
    assert b"\r" not in head.replace(b"\r\n", b"")
    assert not any(line.startswith(b"Bcc:") for line in head.split(b"\r\n"))
    assert head.startswith(b"Received: from evil?Bcc:?victim@x.test ([127.0.0.1])")


# --- garbage, slow clients, many clients ------------------------------------------------------

async def test_pipelined_garbage_is_cut_off(make_server: Callable[..., Any]) -> None:
    """Unknown commands: 500 each, then 502 and a closed connection after five; binary junk lines get
    500 and cannot keep a connection alive past the idle timeout."""
    srv = await make_server(idle_timeout="1s")
    c = await Raw.open(srv.host, srv.port)
    c.writer.write(b"".join(b"GARBAGE%d\r\n" % i for i in range(50)))
    await c.writer.drain()
    replies = [await c.reply() for _ in range(5)]
    assert [r[:3] for r in replies] == [b"500"] * 4 + [b"502"]
    assert await c.closed_within(2)
    c.close()

    c = await Raw.open(srv.host, srv.port)
    t0 = time.monotonic()
    c.writer.write(b"\xff\xfe\x80junk\r\n" * 2000)
    await c.writer.drain()
    assert (await c.reply()).startswith(b"500")
    assert await c.closed_within(5)
    assert time.monotonic() - t0 < 5
    c.close()
    await send_normal_message(srv)


@pytest.mark.parametrize("phase", ["command", "data", "auth"])
async def test_slowloris_closed_by_idle_timeout(make_server: Callable[..., Any], phase: str) -> None:
    """A byte every 0.3 s never completes a command: the 1 s idle timer is not reset by bytes, so the
    server closes the connection in about a second (in the command phase, inside DATA, and while
    waiting for an AUTH answer)."""
    srv = await make_server(idle_timeout="1s", allow_insecure_auth=True)
    c = await Raw.open(srv.host, srv.port)
    if phase == "data":
        await c.envelope()
    elif phase == "auth":
        assert (await c.cmd(b"EHLO client.test\r\n")).startswith(b"250")
        c.writer.write(b"AUTH PLAIN\r\n")
    t0 = time.monotonic()
    sent = 0
    closed = False
    try:
        for byte in (b"MAIL FROM:<slow@loris.test>" * 3)[:30]:  # bounded: 30 bytes, 9 s at most
            c.writer.write(bytes([byte]))
            await c.writer.drain()
            sent += 1
            if await c.closed_within(0.3):
                closed = True
                break
    except ConnectionError:
        closed = True
    finally:
        c.close()
    elapsed = time.monotonic() - t0
    assert closed, f"still open after {sent} bytes"
    assert 0.6 < elapsed < 3, elapsed
    assert sent < 12
    await send_normal_message(srv)


async def test_idle_connections_capped_with_421(make_server: Callable[..., Any]) -> None:
    """300 connections against max_connections = 50: 50 greetings, 250 clear `421 4.7.0`, in bounded
    time; the slots come back when the idle ones leave."""
    srv = await make_server(max_connections=50, idle_timeout="30s")
    t0 = time.monotonic()

    async def one() -> tuple[bytes, Raw]:
        c = await Raw.open(srv.host, srv.port, greet=False)
        return await c.reply(timeout=10), c

    results = await asyncio.gather(*(one() for _ in range(300)))
    elapsed = time.monotonic() - t0
    firsts = [r[:9] for r, _ in results]
    try:
        assert firsts.count(b"220 relay") == 50
        assert firsts.count(b"421 4.7.0") == 250
        assert elapsed < 15, elapsed
        refused = [c for r, c in results if r.startswith(b"421")]
        assert all([await c.closed_within(2) for c in refused[:20]])
        assert srv.listeners.limits.active == 50
    finally:
        for _, c in results:
            c.close()
    for _ in range(100):  # bounded wait for connection_lost on the server side
        if srv.listeners.limits.active == 0:
            break
        await asyncio.sleep(0.05)
    assert srv.listeners.limits.active == 0
    await send_normal_message(srv)


async def test_implicit_tls_silent_client_closed(tmp_path: Path) -> None:
    """A client that connects to the implicit-TLS port and never starts the handshake is dropped after
    the idle timeout (asyncio's own handshake timeout would be 60 s)."""
    pki = TestPki(tmp_path / "pki")
    leaf = pki.leaf("relay.test", "127.0.0.1")
    cfg = config.from_dict({"submission": {"listen": [], "implicit_tls_listen": ["127.0.0.1:0"], "idle_timeout": "1s",
                                           "tls_cert": str(leaf.cert_path), "tls_key": str(leaf.key_path)}})
    store = SpoolStore(tmp_path / "q")
    store.prepare()
    listeners = Listeners(cfg.submission, "relay.test", SubmissionHandler(cfg.submission, "relay.test", store,
                                                                          lambda _m: None))
    await listeners.start()
    try:
        host, port = listeners.addresses()[0]
        c = await Raw.open(host, port, greet=False)
        t0 = time.monotonic()
        assert await c.closed_within(5)
        assert time.monotonic() - t0 < 3
        c.close()
    finally:
        await listeners.stop()


# --- oversized messages -----------------------------------------------------------------------

async def stream_data(c: Raw, shape: str, total: int) -> int:
    """Send `total` octets of DATA in 64 KiB writes, never holding the message in memory; returns the
    peak RSS seen while sending (memory held until the final dot would be freed before the reply)."""
    line = {"lines": b"z" * 998 + b"\r\n", "one_line": b"z" * 1000, "bare_lf": b"z" * 99 + b"\n"}[shape]
    chunk = line * (65536 // len(line))
    sent = peak = 0
    while sent < total:
        c.writer.write(chunk)
        await c.writer.drain()
        sent += len(chunk)
        peak = max(peak, vm_rss())
    c.writer.write(b"\r\n.\r\n")
    await c.writer.drain()
    return peak


@pytest.mark.parametrize("shape", ["lines", "one_line", "bare_lf"])
async def test_oversized_message_552_with_bounded_memory(make_server: Callable[..., Any], shape: str) -> None:
    """30 MB against a 1 MB limit -> 552 5.3.4 after the final dot, without buffering the message: the
    process RSS grows by far less than the message (well-formed lines, one endless line, bare LFs)."""
    srv = await make_server(max_message_size="1MB", idle_timeout="20s")
    c = await Raw.open(srv.host, srv.port)
    try:
        await c.envelope()
        rss0 = vm_rss()
        peak = await stream_data(c, shape, 30 * MB)
        reply = await c.reply(timeout=20)
        growth = max(peak, vm_rss()) - rss0
    finally:
        c.close()
    assert reply.startswith(b"552 5.3.4"), reply
    assert growth < 8 * MB, f"RSS grew by {growth / MB:.1f} MB for a 30 MB message"
    assert srv.accepted == []
    await send_normal_message(srv)


async def test_declared_size_over_limit_refused_at_mail(make_server: Callable[..., Any]) -> None:
    """RFC 1870: MAIL FROM ... SIZE=30000000 against a 1 MB limit -> 552 before any data is sent."""
    srv = await make_server(max_message_size="1MB")
    c = await Raw.open(srv.host, srv.port)
    try:
        assert (await c.cmd(b"EHLO client.test\r\n")).startswith(b"250")
        assert (await c.cmd(b"MAIL FROM:<a@src.test> SIZE=30000000\r\n")).startswith(b"552")
    finally:
        c.close()
    await send_normal_message(srv)


async def test_connection_dropped_mid_data_spools_nothing(make_server: Callable[..., Any]) -> None:
    """A client that vanishes inside DATA leaves nothing in the spool and frees its slot."""
    srv = await make_server(max_connections=1)
    c = await Raw.open(srv.host, srv.port)
    await c.envelope()
    c.writer.write(MSG)  # no final dot
    await c.writer.drain()
    c.close()
    with contextlib.suppress(ConnectionError):
        await c.writer.wait_closed()
    for _ in range(100):
        if srv.listeners.limits.active == 0:
            break
        await asyncio.sleep(0.05)
    assert srv.store.ids() == []
    await send_normal_message(srv)
