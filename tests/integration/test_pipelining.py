"""PERF-6: pipelined delivery (RFC 2920) when the last EHLO offers PIPELINING, against real servers on
loopback: ScriptedMx (tests/support/scripted_mx.py: sees every chunk, sends replies in one segment
or byte by byte, misbehaves on demand) and aiosmtpd's FakeMx. Every rule of mta.delivery.smtp_client
holds as without pipelining; each test also checks whether the connection can serve the next
message (reused through the pool) or is dropped.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from mta.delivery.pool import ConnectionPool
from mta.delivery.smtp_client import SmtpSession, Timeouts, TlsMode
from mta.errors import TransientDeliveryError
from tests.support.fake_mx import MAILBOX_FULL, USER_UNKNOWN, FakeMx
from tests.support.pki import TestPki
from tests.support.scripted_mx import ScriptedMx

ADDR = "127.0.0.46"
MX = "mx.pipe.test"
FAST = Timeouts(connect=2, greeting=2, ehlo=2, mail=2, rcpt=2, data_init=2, data_block=2, data_final=2)
MSG = b"Subject: pipelined\r\n\r\n.leading dot\r\nhello\r\n"
STUFFED = b"Subject: pipelined\r\n\r\n..leading dot\r\nhello\r\n.\r\n"
SENDER = "s@src.test"


async def _open(port: int, timeouts: Timeouts = FAST, mode: TlsMode = TlsMode.MAY,
                ca_file: str | None = None) -> SmtpSession:
    return await SmtpSession.open(address=ADDR, port=port, mx_host=MX, helo_name="relay.test", tls_mode=mode,
                                  ca_file=ca_file, timeouts=timeouts)


async def _through_pool(session: SmtpSession) -> SmtpSession | None:
    """The session back out of a real pool (RSET only where a transaction may be open), or None."""
    pool = ConnectionPool(30.0)
    key = (MX, ADDR, 0, (TlsMode.MAY, None))
    await pool.put(key, session)
    again = await pool.get(key)
    await pool.close_all()
    return again


def _batch(*rcpts: str, size: int = len(MSG)) -> bytes:
    return b"".join([f"MAIL FROM:<{SENDER}> SIZE={size}\r\n".encode(),
                     *(f"RCPT TO:<{r}>\r\n".encode() for r in rcpts), b"DATA\r\n"])


@pytest.mark.parametrize("split", ["one", "bytes"])
async def test_perf_6_one_write_for_the_envelope_with_refused_and_full_recipients(split: str) -> None:
    """MAIL, every RCPT and DATA leave in one write; replies all in one segment or one byte per
    segment; 550 per recipient, 452 temporary (SMTP-18), the body only after 354, then the next
    message on the same connection with no RSET."""
    rcpt = {"gone@x.test": "550 5.1.1 no such user", "full@x.test": "452 4.2.2 mailbox full",
            "gone2@x.test": "552 5.2.2 over quota"}
    async with ScriptedMx(ADDR, split=split, rcpt=rcpt) as mx:
        session = await _open(mx.port)
        assert session.pipelining
        rcpts = ["a@x.test", "gone@x.test", "full@x.test", "b@x.test", "gone2@x.test"]
        result = await session.send(SENDER, rcpts, MSG)
        codes = {r: (reply.code, reply.status) for r, reply in result.replies.items()}
        assert codes == {"a@x.test": (250, "2.0.0"), "b@x.test": (250, "2.0.0"), "gone@x.test": (550, "5.1.1"),
                         "full@x.test": (452, "4.2.2"), "gone2@x.test": (452, "4.2.2")}  # SMTP-18: 552 -> 452
        assert session.idle and await _through_pool(session) is session
        second = await session.send(SENDER, ["c@x.test"], MSG)
        assert second.replies["c@x.test"].code == 250
        await session.close()
    [conv] = mx.conversations
    assert conv.chunks[:4] == [_batch(*rcpts), STUFFED, _batch("c@x.test"), STUFFED]
    assert conv.messages == [(["a@x.test", "b@x.test"], STUFFED[:-3]), (["c@x.test"], STUFFED[:-3])]
    assert b"RSET" not in conv.commands


async def test_perf_6_verify_tls_pipelined_on_the_encrypted_connection(tmp_path: Path) -> None:
    """Over STARTTLS (enforce/VERIFY) the EHLO after the handshake decides; the batch is one TLS write."""
    pki = TestPki(tmp_path / "pki")
    async with ScriptedMx(ADDR, tls_context=pki.leaf(MX).server_context(),
                          rcpt={"gone@x.test": "550 5.1.1 no"}) as mx:
        session = await _open(mx.port, mode=TlsMode.VERIFY, ca_file=str(pki.ca_file))
        assert session.tls is not None and session.tls.verified and session.pipelining
        for _ in range(2):
            result = await session.send(SENDER, ["a@x.test", "gone@x.test"], MSG)
            assert result.replies["a@x.test"].code == 250 and result.replies["gone@x.test"].code == 550
        await session.close()
    [conv] = mx.conversations
    assert conv.commands[:3] == [b"EHLO relay.test", b"STARTTLS", b"EHLO relay.test"]
    assert conv.chunks[0] == b"STARTTLS\r\n"  # then the handshake and EHLO, which are not recorded
    assert conv.chunks[1:5] == [_batch("a@x.test", "gone@x.test"), STUFFED] * 2


async def test_perf_6_aiosmtpd_over_verified_tls_with_refusals_and_reuse(tmp_path: Path) -> None:
    pki = TestPki(tmp_path / "pki")
    async with FakeMx(ADDR, hostname=MX, tls_context=pki.leaf(MX).server_context(), pipelining=True,
                      rcpt_replies={"gone@x.test": USER_UNKNOWN, "full@x.test": MAILBOX_FULL}) as mx:
        session = await _open(mx.port, mode=TlsMode.VERIFY, ca_file=str(pki.ca_file))
        assert session.pipelining
        first = await session.send(SENDER, ["a@x.test", "gone@x.test", "full@x.test", "b@x.test"], MSG)
        assert await _through_pool(session) is session
        second = await session.send("", ["c@x.test"], MSG)  # a bounce: null reverse-path
        await session.close()
        [rec] = await mx.wait_for_sessions(1, closed=True)
    assert {r: x.code for r, x in first.replies.items()} == {"a@x.test": 250, "gone@x.test": 550,
                                                             "full@x.test": 452, "b@x.test": 250}
    assert second.replies["c@x.test"].code == 250
    assert [(m.mail_from, m.rcpt_tos, m.data) for m in mx.messages] == [
        (SENDER, ["a@x.test", "b@x.test"], MSG), ("<>", ["c@x.test"], MSG)]
    assert rec.starttls and not rec.saw("RSET")


@pytest.mark.parametrize(("mail", "permanent"), [("550 5.7.1 sender refused", True), ("451 4.3.0 later", False)])
async def test_perf_6_smtp_23_mail_refused_under_pipelining(mail: str, permanent: bool) -> None:
    """MAIL 5xx is final for every recipient, 4xx goes to the next host; the 503s to the RCPTs and
    DATA of the same write are read, so the next message on the connection is paired right."""
    async with ScriptedMx(ADDR, mail=mail) as mx:
        session = await _open(mx.port)
        if permanent:
            result = await session.send(SENDER, ["a@x.test", "b@x.test"], MSG)
            assert {(r.code, r.status) for r in result.replies.values()} == {(550, "5.7.1")}
            assert result.mail_reply is not None and result.data_reply is None
        else:
            with pytest.raises(TransientDeliveryError) as info:
                await session.send(SENDER, ["a@x.test", "b@x.test"], MSG)
            assert info.value.reply.code == 451 and not session.lost_at_mail
        assert session.idle and await _through_pool(session) is session
        mx.mail = "250 2.1.0 ok"
        again = await session.send(SENDER, ["c@x.test"], MSG)
        assert again.replies["c@x.test"].code == 250
        await session.close()
    [conv] = mx.conversations
    assert conv.chunks[0] == _batch("a@x.test", "b@x.test")  # RCPT and DATA went with the refused MAIL
    assert [m[0] for m in conv.messages] == [["c@x.test"]] and b"RSET" not in conv.commands


@pytest.mark.parametrize(("anyway", "data"), [
    (False, "354 unused"),  # the server refuses DATA: 503 no valid recipients
    (True, "554 5.5.1 no valid recipients"),
    (True, "354 go ahead"),  # hostile: 354 although no RCPT was accepted
])
async def test_perf_6_smtp_20_no_recipient_accepted(anyway: bool, data: str) -> None:
    """SMTP-20 under pipelining (RFC 2920 §3.1): DATA was sent with the RCPTs; refused, the
    transaction is reset; a 354 all the same gets only the terminating dot, never the body."""
    async with ScriptedMx(ADDR, data_anyway=anyway, data=data, end="250 2.0.0 nothing at all",
                          rcpt={"x@x.test": "550 5.1.1 no", "y@x.test": "450 4.2.1 later"}) as mx:
        session = await _open(mx.port)
        result = await session.send(SENDER, ["x@x.test", "y@x.test"], MSG)
        assert result.replies["x@x.test"].status == "5.1.1" and result.replies["y@x.test"].status == "4.2.1"
        assert result.data_reply is None
        assert session.idle and await _through_pool(session) is session
        mx.rcpt, mx.data_anyway, mx.data = {}, False, "354 go ahead"
        assert (await session.send(SENDER, ["c@x.test"], MSG)).replies["c@x.test"].code == 250
        await session.close()
    [conv] = mx.conversations
    assert conv.chunks[0] == _batch("x@x.test", "y@x.test")
    if anyway and data.startswith("354"):
        assert conv.chunks[1] == b".\r\n" and conv.messages[0] == ([], b"")  # the dot, not the message
        assert b"RSET" not in conv.commands
    else:
        assert conv.chunks[1] == b"RSET\r\n"
    assert conv.messages[-1] == (["c@x.test"], STUFFED[:-3])


@pytest.mark.parametrize("close_after", [0, 1, 2, 4])
async def test_perf_6_smtp_22_server_closes_mid_batch(close_after: int) -> None:
    """The server hangs up after some replies of the batch: at MAIL -> next host (SMTP-23, a pooled
    connection gets a new one: lost_at_mail); later -> 451 4.4.2 for every open recipient (SMTP-22)."""
    async with ScriptedMx(ADDR, close_after=close_after, rcpt={"gone@x.test": "550 5.1.1 no"}) as mx:
        session = await _open(mx.port)
        rcpts = ["a@x.test", "gone@x.test", "b@x.test"]
        if close_after == 0:
            with pytest.raises(TransientDeliveryError) as info:
                await session.send(SENDER, rcpts, MSG)
            assert info.value.reply.status == "4.4.2" and session.lost_at_mail
        else:
            result = await session.send(SENDER, rcpts, MSG)
            open_ones = {"a@x.test", "b@x.test"} | ({"gone@x.test"} if close_after < 3 else set())
            assert {r for r, x in result.replies.items() if (x.code, x.status) == (451, "4.4.2")} == open_ones
            assert close_after < 3 or result.replies["gone@x.test"].code == 550
        assert not session.usable and await _through_pool(session) is None
        assert not mx.conversations[0].messages


async def test_perf_6_smtp_31_each_reply_has_its_own_timeout() -> None:
    """Replies 0.25 s apart with 0.6 s timeouts: 7 replies take ~1.75 s, more than any one timeout,
    and the message is delivered, because each reply of the batch is timed on its own (SMTP-31)."""
    timeouts = Timeouts(connect=2, greeting=2, ehlo=2, mail=0.6, rcpt=0.6, data_init=0.6, data_block=2,
                        data_final=0.6)
    async with ScriptedMx(ADDR, gap=0.25) as mx:
        session = await _open(mx.port, timeouts)
        started = time.monotonic()
        result = await session.send(SENDER, ["a@x.test", "b@x.test", "c@x.test", "d@x.test"], MSG)
        assert time.monotonic() - started > 1.2
        assert {x.code for x in result.replies.values()} == {250} and session.usable
        await session.close()


@pytest.mark.parametrize(("stall_at", "step"), [("MAIL", None), ("RCPT", "RCPT TO"), ("DATA", "DATA")])
async def test_perf_6_smtp_32_a_reply_that_never_comes(stall_at: str, step: str | None) -> None:
    timeouts = Timeouts(connect=2, greeting=2, ehlo=2, mail=0.3, rcpt=0.3, data_init=0.3, data_block=2,
                        data_final=0.3)
    async with ScriptedMx(ADDR, stall_at=stall_at) as mx:
        session = await _open(mx.port, timeouts)
        started = time.monotonic()
        if step is None:
            with pytest.raises(TransientDeliveryError) as info:
                await session.send(SENDER, ["a@x.test", "b@x.test"], MSG)
            assert "timeout at MAIL FROM" in info.value.reply.text and not session.lost_at_mail
        else:
            result = await session.send(SENDER, ["a@x.test", "b@x.test"], MSG)
            for reply in result.replies.values():
                assert (reply.code, reply.status) == (451, "4.4.2") and f"timeout at {step}" in reply.text
        assert time.monotonic() - started < 1.5
        assert not session.usable and await _through_pool(session) is None


@pytest.mark.parametrize("huge_at", ["MAIL", "RCPT", "DATA", "END"])
async def test_perf_6_over_long_reply_drops_the_connection(huge_at: str) -> None:
    """A reply over 32 KiB is outside the protocol: 451 4.5.0 for every open recipient (or, at MAIL,
    the next host), never delivered, never bounced, and the connection is not reused."""
    async with ScriptedMx(ADDR, huge_at=huge_at) as mx:
        session = await _open(mx.port)
        if huge_at == "MAIL":
            with pytest.raises(TransientDeliveryError) as info:
                await session.send(SENDER, ["a@x.test"], MSG)
            assert info.value.reply.status == "4.5.0"
        else:
            result = await session.send(SENDER, ["a@x.test", "b@x.test"], MSG)
            assert {(x.code, x.status) for x in result.replies.values()} == {(451, "4.5.0")}
        assert not session.usable and await _through_pool(session) is None


async def test_perf_6_a_reply_too_many_is_never_paired_with_the_next_command() -> None:
    async with ScriptedMx(ADDR, extra_after_end=True) as mx:
        session = await _open(mx.port)
        result = await session.send(SENDER, ["a@x.test"], MSG)
        assert result.replies["a@x.test"].code == 250  # the 250 to the end of data came first
        assert not session.usable and await _through_pool(session) is None


async def test_perf_6_421_closes_the_connection() -> None:
    async with ScriptedMx(ADDR, rcpt={"b@x.test": "421 4.3.2 shutting down"}) as mx:
        session = await _open(mx.port)
        result = await session.send(SENDER, ["a@x.test", "b@x.test", "c@x.test"], MSG)
        assert result.replies["b@x.test"].code == 421
        assert {result.replies[r].status for r in ("a@x.test", "c@x.test")} == {"4.4.2"}
        assert not session.usable


async def test_perf_6_server_without_pipelining_gets_one_command_at_a_time() -> None:
    async with ScriptedMx(ADDR, pipelining=False, rcpt={"gone@x.test": "550 5.1.1 no"}) as mx:
        session = await _open(mx.port)
        assert not session.pipelining
        result = await session.send(SENDER, ["a@x.test", "gone@x.test"], MSG)
        assert result.replies["a@x.test"].code == 250 and result.replies["gone@x.test"].code == 550
        mx.mail = "550 5.7.1 no"
        refused = await session.send(SENDER, ["a@x.test"], MSG)
        assert refused.replies["a@x.test"].code == 550
        await session.close()
    [conv] = mx.conversations
    assert conv.chunks[:6] == [_batch()[:-6], b"RCPT TO:<a@x.test>\r\n", b"RCPT TO:<gone@x.test>\r\n", b"DATA\r\n",
                               STUFFED, _batch()[:-6]]
    assert conv.chunks[6:] == [b"QUIT\r\n"]  # no RCPT after the refused MAIL
