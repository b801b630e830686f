"""Submission listener over real sockets: relay control, AUTH, limits, headers, capabilities."""

from __future__ import annotations

import asyncio
import smtplib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from mta import config
from mta.spool.state import MessageMeta
from mta.spool.store import SpoolStore
from mta.submission.auth import set_password
from mta.submission.handler import SubmissionHandler
from mta.submission.listener import Listeners
from tests.support.pki import TestPki
from tests.support.submission import Server, start_server

MSG = b"From: a@src.test\r\nTo: b@dst.test\r\nSubject: hi\r\n\r\nhello\r\n"


@pytest.fixture
def pki(tmp_path: Path) -> TestPki:
    return TestPki(tmp_path / "pki")


@pytest.fixture
async def make_server(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    started: list[Server] = []

    async def make(host: str = "127.0.0.1", **sub: Any) -> Server:
        srv = await start_server(tmp_path / "q", tmp_path,
                                 **{"listen": [f"{host}:0"], "auth_failure_delay": "200ms", **sub})
        started.append(srv)
        return srv

    yield make
    for srv in started:
        await srv.listeners.stop()


async def test_accepts_spools_and_adds_headers(make_server: Callable[..., Any]) -> None:
    srv = await make_server()

    def send() -> dict[str, tuple[int, bytes]]:
        with smtplib.SMTP(srv.host, srv.port, timeout=5) as s:
            return s.sendmail("a@src.test", ["b@dst.test"], MSG)

    assert await asyncio.to_thread(send) == {}
    assert len(srv.accepted) == 1
    meta = srv.accepted[0]
    assert srv.store.load_sync(meta.id) == meta
    data = srv.store.read_data_sync(meta.id)
    head = data.split(b"\r\n\r\n")[0]
    assert head.startswith(b"Received: from ")  # SMTP-43: prepended
    assert b"by relay.test (mta) with ESMTP" in head
    assert b"\r\nMessage-ID: <" in head and b"\r\nDate: " in head  # RFC 6409 §8
    assert data.endswith(b"\r\n\r\nhello\r\n")


async def test_existing_message_id_and_date_kept(make_server: Callable[..., Any]) -> None:
    srv = await make_server()
    msg = b"Message-ID: <x@y>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\nbody\r\n"
    async with aiosmtplib.SMTP(hostname=srv.host, port=srv.port, start_tls=False) as c:
        await c.sendmail("a@src.test", ["b@dst.test"], msg)
    data = srv.store.read_data_sync(srv.accepted[0].id)
    assert data.count(b"Message-ID:") == 1 and data.count(b"\r\nDate:") == 1


async def test_ehlo_capabilities(make_server: Callable[..., Any], pki: TestPki) -> None:
    leaf = pki.leaf("relay.test")
    srv = await make_server(tls_cert=str(leaf.cert_path), tls_key=str(leaf.key_path))
    async with aiosmtplib.SMTP(hostname=srv.host, port=srv.port, start_tls=False) as c:
        await c.ehlo()
        for ext in ("size", "8bitmime", "smtputf8", "pipelining", "enhancedstatuscodes", "starttls"):
            assert c.supports_extension(ext), ext
        assert not c.supports_extension("auth")  # no users file: no AUTH at all
        assert c.esmtp_extensions["size"] == "25000000"


async def test_bare_lf_becomes_crlf_no_smuggling(make_server: Callable[..., Any]) -> None:
    """SMTP-26 decision: bare LF/CR are normalised; `\\n.\\n` never ends the data early."""
    srv = await make_server()
    reader, writer = await asyncio.open_connection(srv.host, srv.port)

    async def cmd(line: bytes) -> bytes:
        writer.write(line)
        await writer.drain()
        return await asyncio.wait_for(reader.readline(), 5)

    await reader.readline()
    assert (await cmd(b"HELO c\r\n")).startswith(b"250")
    assert (await cmd(b"MAIL FROM:<a@src.test>\r\n")).startswith(b"250")
    assert (await cmd(b"RCPT TO:<b@dst.test>\r\n")).startswith(b"250")
    assert (await cmd(b"DATA\r\n")).startswith(b"354")
    reply = await cmd(b"Subject: x\r\n\r\nline1\n.\nMAIL FROM:<evil@x>\nline2\r\n.\r\n")
    assert reply.startswith(b"250")
    writer.close()
    assert len(srv.accepted) == 1
    data = srv.store.read_data_sync(srv.accepted[0].id)
    assert b"line1\r\n.\r\nMAIL FROM:<evil@x>\r\nline2\r\n" in data
    assert b"\n" not in data.replace(b"\r\n", b"")


async def test_relay_refused_outside_relay_networks(make_server: Callable[..., Any]) -> None:
    srv = await make_server(host="127.0.0.2", relay_networks=["127.0.0.2/32"])
    probes = ["b@dst.test", "user%other@dst.test", '"user@other"@dst.test', "@a.test:user@b.test",
              "user@other@dst.test", "other!user@dst.test", "user@[127.0.0.1]", "USER@DST.TEST.", "postmaster"]
    async with aiosmtplib.SMTP(hostname=srv.host, port=srv.port, source_address=("127.0.0.3", 0),
                               start_tls=False) as c:
        await c.ehlo()
        for rcpt in probes:
            await c.mail("a@relay.test")
            with pytest.raises(aiosmtplib.SMTPRecipientRefused) as err:
                await c.rcpt(rcpt)
            # Refused: 554 5.7.1 by relay control, or 553 by the address parser for source routes.
            assert (err.value.code, err.value.message[:5]) in ((554, "5.7.1"), (553, "5.1.3")), rcpt
            await c.rset()
    assert srv.accepted == []


async def test_relay_allowed_inside_networks(make_server: Callable[..., Any]) -> None:
    srv = await make_server(host="127.0.0.2", relay_networks=["127.0.0.3/32"])
    async with aiosmtplib.SMTP(hostname=srv.host, port=srv.port, source_address=("127.0.0.3", 0),
                               start_tls=False) as c:
        errors, _ = await c.sendmail("a@src.test", ["b@dst.test"], MSG)
    assert errors == {}
    assert len(srv.accepted) == 1


async def test_auth_over_starttls_allows_relay(make_server: Callable[..., Any], pki: TestPki,
                                               tmp_path: Path) -> None:
    users = tmp_path / "users"
    set_password(str(users), "alice", "s3cret")
    leaf = pki.leaf("relay.test", "127.0.0.2")
    srv = await make_server(host="127.0.0.2", relay_networks=["127.0.0.2/32"], users_file=str(users),
                            tls_cert=str(leaf.cert_path), tls_key=str(leaf.key_path))
    ctx = pki.client_context()
    async with aiosmtplib.SMTP(hostname=srv.host, port=srv.port, source_address=("127.0.0.3", 0),
                               start_tls=False, tls_context=ctx) as c:
        await c.ehlo()
        assert not c.supports_extension("auth")  # AUTH only after TLS
        early = await c.execute_command(b"AUTH", b"PLAIN", b"AGFsaWNlAHMzY3JldA==")
        assert early.code == 538
        await c.starttls(server_hostname="relay.test")
        await c.ehlo()
        assert c.supports_extension("auth")
        with pytest.raises(aiosmtplib.SMTPAuthenticationError):
            await c.login("alice", "wrong")
        with pytest.raises(aiosmtplib.SMTPAuthenticationError):
            await c.login("mallory", "s3cret")
        await c.login("alice", "s3cret")
        errors, _ = await c.sendmail("a@src.test", ["b@dst.test"], MSG)
    assert errors == {}
    assert len(srv.accepted) == 1


async def test_repeated_auth_failures_are_delayed(make_server: Callable[..., Any], tmp_path: Path) -> None:
    users = tmp_path / "users"
    set_password(str(users), "alice", "s3cret")
    srv = await make_server(users_file=str(users), allow_insecure_auth=True)
    loop = asyncio.get_running_loop()
    async with aiosmtplib.SMTP(hostname=srv.host, port=srv.port, start_tls=False) as c:
        await c.ehlo()
        times = []
        for _ in range(3):
            t0 = loop.time()
            with pytest.raises(aiosmtplib.SMTPAuthenticationError):
                await c.login("alice", "nope")
            times.append(loop.time() - t0)
    assert times[1] >= 0.2 and times[2] >= 0.4  # 200ms per earlier failure


async def test_size_limit_552(make_server: Callable[..., Any]) -> None:
    srv = await make_server(max_message_size="2KB")
    async with aiosmtplib.SMTP(hostname=srv.host, port=srv.port, start_tls=False) as c:
        with pytest.raises(aiosmtplib.SMTPResponseException) as err:
            await c.sendmail("a@src.test", ["b@dst.test"], b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n" * 0
                             + (b"y" * 998 + b"\r\n") * 3)
    assert err.value.code == 552
    assert srv.accepted == []


async def test_recipient_limit_452(make_server: Callable[..., Any]) -> None:
    srv = await make_server(max_recipients=2)
    async with aiosmtplib.SMTP(hostname=srv.host, port=srv.port, start_tls=False) as c:
        await c.ehlo()
        await c.mail("a@src.test")
        await c.rcpt("1@dst.test")
        await c.rcpt("2@dst.test")
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as err:
            await c.rcpt("3@dst.test")
    assert err.value.code == 452 and "4.5.3" in err.value.message


async def test_long_line_rejected(make_server: Callable[..., Any]) -> None:
    """SMTP-27 decision: a line over 1000 octets is refused, not rewrapped."""
    srv = await make_server()
    async with aiosmtplib.SMTP(hostname=srv.host, port=srv.port, start_tls=False) as c:
        with pytest.raises(aiosmtplib.SMTPResponseException) as err:
            await c.sendmail("a@src.test", ["b@dst.test"], b"Subject: x\r\n\r\n" + b"z" * 1200 + b"\r\n")
    assert err.value.code == 500
    assert srv.accepted == []


async def test_connection_cap_421(make_server: Callable[..., Any]) -> None:
    srv = await make_server(max_connections=2)
    held = [await asyncio.open_connection(srv.host, srv.port) for _ in range(2)]
    for r, _w in held:
        assert (await asyncio.wait_for(r.readline(), 5)).startswith(b"220")
    r3, w3 = await asyncio.open_connection(srv.host, srv.port)
    assert (await asyncio.wait_for(r3.readline(), 5)).startswith(b"421 4.7.0")
    w3.close()
    for _r, w in held:
        w.close()
    await asyncio.sleep(0.1)
    r4, w4 = await asyncio.open_connection(srv.host, srv.port)
    assert (await asyncio.wait_for(r4.readline(), 5)).startswith(b"220")
    w4.close()


async def test_implicit_tls_listener(tmp_path: Path, pki: TestPki) -> None:
    leaf = pki.leaf("relay.test", "127.0.0.1")
    cfg = config.from_dict({"submission": {"listen": [], "implicit_tls_listen": ["127.0.0.1:0"],
                                           "tls_cert": str(leaf.cert_path), "tls_key": str(leaf.key_path)}})
    store = SpoolStore(tmp_path / "q")
    store.prepare()
    accepted: list[MessageMeta] = []
    listeners = Listeners(cfg.submission, "relay.test", SubmissionHandler(cfg.submission, "relay.test", store,
                                                                          accepted.append))
    await listeners.start()
    try:
        host, port = listeners.addresses()[0]
        ctx = pki.client_context()
        async with aiosmtplib.SMTP(hostname=host, port=port, use_tls=True, tls_context=ctx) as c:
            errors, _ = await c.sendmail("a@src.test", ["b@dst.test"], MSG)
        assert errors == {} and len(accepted) == 1
    finally:
        await listeners.stop()
