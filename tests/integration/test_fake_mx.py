"""The fake MX itself (the O-MX observable): it must show what a real MX would see, and misbehave on request."""

from __future__ import annotations

import asyncio
import smtplib
import socket
import time
from pathlib import Path

import aiosmtplib
import pytest

from tests.support.fake_mx import USER_UNKNOWN, FakeMx
from tests.support.pki import TestPki

ADDR = "127.0.0.43"
MSG = b"Subject: hi\r\n\r\n.leading dot\r\nbody\r\n"


@pytest.fixture
def pki(tmp_path: Path) -> TestPki:
    return TestPki(tmp_path / "pki")


def test_o_mx_thread_variant_serves_sync_clients() -> None:
    mx = FakeMx(ADDR, rcpt_replies={"gone@example.com": USER_UNKNOWN}).start_in_thread()
    port = mx.port
    try:
        with smtplib.SMTP(ADDR, port, local_hostname="client.test", timeout=5) as client:
            refused = client.sendmail("a@src.test", ["b@example.com", "gone@example.com"], MSG)
        assert refused == {"gone@example.com": (550, b"5.1.1 no such user")}
        [msg] = mx.wait_for_messages_blocking(1, timeout=5)
        assert msg.mail_from == "a@src.test" and msg.rcpt_tos == ["b@example.com"] and msg.data == MSG
        assert mx.sessions[0].ehlo_names == ["client.test"] and mx.sessions[0].verbs[-1] == "QUIT"
    finally:
        mx.stop_thread()
    with pytest.raises(OSError), socket.create_connection((ADDR, port), timeout=1):
        pass


async def test_o_mx_port_25_on_a_loopback_alias() -> None:
    async with FakeMx("127.0.0.44", 25) as mx:
        assert mx.port == 25
        reader, writer = await asyncio.open_connection("127.0.0.44", 25)
        greeting = await asyncio.wait_for(reader.readline(), 2)
        writer.close()
        assert greeting.startswith(b"220 ")


async def test_o_mx_records_sni_and_tls_version(pki: TestPki) -> None:
    async with FakeMx(ADDR, tls_context=pki.leaf("mx9.example.com").server_context()) as mx:
        client = aiosmtplib.SMTP(hostname=ADDR, port=mx.port, start_tls=False, local_hostname="client.test")
        await client.connect()
        await client.ehlo()
        assert client.supports_extension("starttls")
        await client.starttls(server_hostname="mx9.example.com", tls_context=pki.client_context())
        await client.ehlo()
        assert not client.supports_extension("starttls")  # not offered twice
        await client.sendmail("a@src.test", ["b@example.com"], MSG)
        await client.quit()
        [rec] = await mx.wait_for_sessions(1, closed=True)
        assert rec.starttls and rec.sni == "mx9.example.com" and rec.tls_version in ("TLSv1.2", "TLSv1.3")
        assert rec.ehlo_names == ["client.test", "client.test"]
        assert mx.messages[0].tls_version == rec.tls_version and mx.messages[0].sni == "mx9.example.com"


async def test_o_mx_broken_tls_fails_the_handshake(pki: TestPki) -> None:
    async with FakeMx(ADDR, broken_tls=True) as mx:
        client = aiosmtplib.SMTP(hostname=ADDR, port=mx.port, start_tls=False, local_hostname="client.test",
                                 timeout=2)
        await client.connect()
        await client.ehlo()
        assert client.supports_extension("starttls")
        with pytest.raises(Exception):  # noqa: B017 - any handshake failure will do
            await client.starttls(server_hostname="mx.example.com", tls_context=pki.client_context())
        client.close()
        [rec] = await mx.wait_for_sessions(1, closed=True)
        assert rec.starttls_attempted and not rec.starttls


async def test_o_mx_greeting_override_and_stalled_greeting() -> None:
    async with FakeMx(ADDR, greeting="421 4.3.2 go away") as mx:
        reader, writer = await asyncio.open_connection(ADDR, mx.port)
        assert await asyncio.wait_for(reader.readline(), 2) == b"421 4.3.2 go away\r\n"
        assert await asyncio.wait_for(reader.read(), 2) == b""  # and the server hangs up
        writer.close()
    async with FakeMx(ADDR, stall_greeting=True) as mx:
        reader, writer = await asyncio.open_connection(ADDR, mx.port)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.readline(), 0.3)
        writer.close()
        started = time.monotonic()
    assert time.monotonic() - started < 2.5  # stop() does not wait for the stalled session


async def test_o_mx_capabilities_follow_the_knobs(pki: TestPki) -> None:
    async with FakeMx(ADDR, size_limit=1234, eightbitmime=False, smtputf8=True) as mx:
        client = aiosmtplib.SMTP(hostname=ADDR, port=mx.port, start_tls=False, local_hostname="client.test")
        await client.connect()
        await client.ehlo()
        assert client.esmtp_extensions.get("size") == "1234"
        assert not client.supports_extension("8bitmime") and client.supports_extension("smtputf8")
        assert not client.supports_extension("starttls")
        await client.quit()


async def test_o_mx_reply_overrides_drop_and_transcript() -> None:
    async with FakeMx(ADDR, replies={"MAIL": "451 4.3.0 not now"}, drop_after="RSET") as mx:
        client = aiosmtplib.SMTP(hostname=ADDR, port=mx.port, start_tls=False, local_hostname="client.test")
        await client.connect()
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as info:
            await client.mail("a@src.test")
        assert info.value.code == 451
        with pytest.raises(aiosmtplib.SMTPServerDisconnected):
            await client.rset()
        [rec] = await mx.wait_for_sessions(1, closed=True)
        assert rec.commands == ["EHLO client.test", "MAIL FROM:<a@src.test>", "RSET"]
        assert not mx.messages


async def test_o_mx_stall_at_a_command_never_answers() -> None:
    async with FakeMx(ADDR, stall_at="RCPT") as mx:
        client = aiosmtplib.SMTP(hostname=ADDR, port=mx.port, start_tls=False, local_hostname="client.test")
        await client.connect()
        await client.mail("a@src.test")
        with pytest.raises(aiosmtplib.SMTPTimeoutError):
            await client.rcpt("b@example.com", timeout=0.3)
        client.close()


async def test_o_mx_wait_for_messages_is_bounded() -> None:
    async with FakeMx(ADDR) as mx:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await mx.wait_for_messages(1, timeout=0.2)
        assert time.monotonic() - started < 1.0


async def test_o_mx_stop_closes_open_connections() -> None:
    mx = await FakeMx(ADDR).start()
    reader, writer = await asyncio.open_connection(ADDR, mx.port)
    await asyncio.wait_for(reader.readline(), 2)
    await mx.stop()
    assert await asyncio.wait_for(reader.read(), 2) == b""
    writer.close()
    assert mx.sessions[0].closed_at is not None
