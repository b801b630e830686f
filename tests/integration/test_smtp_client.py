"""SmtpSession against real fake MX servers on loopback (O-MX): TLS modes, replies, timeouts, reuse."""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path
from typing import Any

import pytest

from mta.delivery.smtp_client import SmtpSession, Timeouts, TlsMode, TlsRequiredError
from mta.errors import TransientDeliveryError
from mta.sts.decide import cert_result_type
from tests.support.fake_mx import USER_UNKNOWN, FakeMx
from tests.support.pki import Leaf, TestPki

MX = "mx1.example.com"
ADDR = "127.0.0.41"
FAST = Timeouts(connect=2, greeting=2, ehlo=2, mail=2, rcpt=2, data_init=2, data_block=2, data_final=2)
MSG = b"From: a@src.test\r\nTo: b@example.com\r\nSubject: test\r\n\r\nhello\r\n"


@pytest.fixture
def pki(tmp_path: Path) -> TestPki:
    return TestPki(tmp_path / "pki")


def _leaf(pki: TestPki, kind: str) -> Leaf:
    """valid / expired / untrusted / cn-only certificates for MX, or wrong-name (mx2) / parent-only SANs."""
    if kind == "cn-only":
        return pki.cn_only_leaf(MX)
    if kind in ("wrong-name", "parent-only"):
        return pki.leaf("mx2.example.com" if kind == "wrong-name" else "example.com")
    return pki.leaf(MX, expired=kind == "expired", untrusted=kind == "untrusted")


async def open_session(mx: FakeMx, pki: TestPki, mode: TlsMode = TlsMode.MAY, *, mx_host: str = MX,
                       timeouts: Timeouts = FAST) -> SmtpSession:
    return await SmtpSession.open(address=ADDR, port=mx.port, mx_host=mx_host, helo_name="relay.test",
                                  tls_mode=mode, ca_file=str(pki.ca_file), timeouts=timeouts)


# --- STARTTLS and certificates (RFC 8461 §4.2, §5; RFC 3207) ------------------------------------

async def test_sts_79_verified_starttls_sni_is_mx_name_and_smtp_15_ehlo_again(pki: TestPki, fake_mx: Any) -> None:
    mx = await fake_mx(tls_context=pki.leaf(MX).server_context())
    session = await open_session(mx, pki, TlsMode.VERIFY, mx_host="MX1.Example.COM.")  # ID-1, trailing dot
    assert session.tls is not None and session.tls.verified and session.tls.error is None
    assert session.tls.version in ("TLSv1.2", "TLSv1.3")  # STS-80
    result = await session.send("a@src.test", ["b@example.com"], MSG)
    await session.close()
    assert result.replies["b@example.com"].code == 250
    [rec] = await mx.wait_for_sessions(1, closed=True)
    assert rec.sni == MX  # STS-79: the MX name, lower-case, without the trailing dot
    assert rec.starttls and rec.verbs[:3] == ["EHLO", "STARTTLS", "EHLO"]  # SMTP-15
    [msg] = mx.messages
    assert msg.tls_version == session.tls.version and msg.data == MSG


async def test_sts_77_wildcard_certificate_matches_one_label(pki: TestPki, fake_mx: Any) -> None:
    mx = await fake_mx(tls_context=pki.leaf("*.example.com").server_context())
    session = await open_session(mx, pki, TlsMode.VERIFY)
    assert session.tls is not None and session.tls.verified
    await session.close()


async def test_sts_75_verify_without_starttls_never_sends_mail(pki: TestPki, fake_mx: Any) -> None:
    mx = await fake_mx()
    with pytest.raises(TlsRequiredError) as info:
        await open_session(mx, pki, TlsMode.VERIFY)
    assert info.value.result_type == "starttls-not-supported"
    assert info.value.reply.transient and info.value.reply.status == "4.7.5"
    [rec] = await mx.wait_for_sessions(1, closed=True)
    assert rec.verbs == ["EHLO", "QUIT"]  # no MAIL FROM on that connection


async def test_sts_92_starttls_refused_counts_as_not_supported(pki: TestPki, fake_mx: Any) -> None:
    mx = await fake_mx(tls_context=pki.leaf(MX).server_context(), replies={"STARTTLS": "454 4.7.0 TLS not available"})
    with pytest.raises(TlsRequiredError) as info:
        await open_session(mx, pki, TlsMode.VERIFY)
    assert info.value.result_type == "starttls-not-supported"
    assert not mx.saw("MAIL")


async def test_sts_92_may_starttls_refused_continues_in_plaintext(pki: TestPki, fake_mx: Any) -> None:
    mx = await fake_mx(tls_context=pki.leaf(MX).server_context(), replies={"STARTTLS": "454 4.7.0 TLS not available"})
    session = await open_session(mx, pki, TlsMode.MAY)
    assert not session.starttls_offered  # reported as starttls-not-supported under testing
    assert session.tls is not None and session.tls.version is None and "454" in (session.tls.error or "")
    result = await session.send("a@src.test", ["b@example.com"], MSG)
    await session.close()
    assert result.replies["b@example.com"].code == 250
    [rec] = await mx.wait_for_sessions(1, closed=True)
    assert rec.verbs[:3] == ["EHLO", "STARTTLS", "MAIL"] and mx.messages[0].tls_version is None


@pytest.mark.req("STS-77", "STS-78", "ID-6")
@pytest.mark.parametrize(("kind", "result_type"), [
    ("wrong-name", "certificate-host-mismatch"),  # STS-77: SAN mx2 for MX mx1
    ("parent-only", "certificate-host-mismatch"),  # STS-77: SAN example.com only
    ("cn-only", "certificate-host-mismatch"),  # STS-78 / ID-6: the CN is never consulted
    ("expired", "certificate-expired"),
    ("untrusted", "certificate-not-trusted"),
])
async def test_sts_76_verify_rejects_bad_certificate_without_plaintext_retry(
        pki: TestPki, fake_mx: Any, kind: str, result_type: str) -> None:
    mx = await fake_mx(tls_context=_leaf(pki, kind).server_context())
    with pytest.raises(TlsRequiredError) as info:
        await open_session(mx, pki, TlsMode.VERIFY)
    assert info.value.result_type == result_type
    sessions = await mx.wait_for_sessions(1, closed=True)
    assert len(sessions) == 1  # STS-76: no plaintext retry to the same host
    assert not mx.saw("MAIL") and sessions[0].sni == MX


async def test_sts_76_verify_broken_handshake_is_validation_failure(pki: TestPki, fake_mx: Any) -> None:
    mx = await fake_mx(broken_tls=True)
    with pytest.raises(TlsRequiredError) as info:
        await open_session(mx, pki, TlsMode.VERIFY)
    assert info.value.result_type == "validation-failure"
    sessions = await mx.wait_for_sessions(1, closed=True)
    assert len(sessions) == 1 and not mx.saw("MAIL")


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
async def test_sts_80_verify_refuses_tls_below_1_2(pki: TestPki, fake_mx: Any) -> None:
    ctx = pki.leaf(MX).server_context()
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    mx = await fake_mx(tls_context=ctx)
    with pytest.raises(TlsRequiredError) as info:
        await open_session(mx, pki, TlsMode.VERIFY)
    assert info.value.result_type == "validation-failure"
    assert not mx.saw("MAIL")


async def test_smtp_16_may_broken_tls_retries_once_in_plaintext(pki: TestPki, fake_mx: Any) -> None:
    mx = await fake_mx(broken_tls=True)
    session = await open_session(mx, pki, TlsMode.MAY)
    assert session.starttls_offered
    assert session.tls is not None and session.tls.version is None and session.tls.error  # plaintext, reason kept
    result = await session.send("a@src.test", ["b@example.com"], MSG)
    await session.close()
    assert result.replies["b@example.com"].code == 250
    first, second = await mx.wait_for_sessions(2, closed=True)
    assert first.saw("STARTTLS") and not first.saw("MAIL")
    assert not second.saw("STARTTLS") and second.saw("MAIL")
    assert mx.messages[0].tls_version is None


@pytest.mark.parametrize(("kind", "result_type"), [
    ("valid", None),
    ("wrong-name", "certificate-host-mismatch"),
    ("cn-only", "certificate-host-mismatch"),
    ("expired", "certificate-expired"),
    ("untrusted", "certificate-not-trusted"),
])
async def test_sts_84_may_delivers_over_tls_and_records_verification(
        pki: TestPki, fake_mx: Any, kind: str, result_type: str | None) -> None:
    mx = await fake_mx(tls_context=_leaf(pki, kind).server_context())
    session = await open_session(mx, pki, TlsMode.MAY)
    assert session.tls is not None and session.tls.version is not None
    assert session.tls.verified is (result_type is None)
    if result_type is not None:
        assert cert_result_type(session.tls.error) == result_type  # same classifier as the enforce path
    result = await session.send("a@src.test", ["b@example.com"], MSG)
    await session.close()
    assert result.replies["b@example.com"].code == 250
    assert mx.messages[0].tls_version == session.tls.version


# --- greeting, EHLO, connection (RFC 5321 §3.2, §4.1.1.1, §5.1) ------------------------------------

async def test_broken_ca_file_is_a_local_transient_error(pki: TestPki, fake_mx: Any, tmp_path: Path) -> None:
    mx = await fake_mx(tls_context=pki.leaf(MX).server_context())
    empty = tmp_path / "empty.pem"
    empty.write_text("")
    with pytest.raises(TransientDeliveryError) as info:
        await SmtpSession.open(address=ADDR, port=mx.port, mx_host=MX, helo_name="relay.test",
                               tls_mode=TlsMode.VERIFY, ca_file=str(empty), timeouts=FAST)
    assert not isinstance(info.value, TlsRequiredError)  # not the MX's failure: nothing to report about it
    assert not mx.sessions
    session = await SmtpSession.open(address=ADDR, port=mx.port, mx_host=MX, helo_name="relay.test",
                                     tls_mode=TlsMode.MAY, ca_file=str(empty), timeouts=FAST)
    await session.close()
    assert session.tls is not None and not session.tls.verified and "not checked" in (session.tls.error or "")


async def test_smtp_14_helo_fallback_when_ehlo_unrecognised(pki: TestPki, fake_mx: Any) -> None:
    mx = await fake_mx(replies={"EHLO": "502 5.5.1 command not recognised"})
    session = await open_session(mx, pki)
    result = await session.send("a@src.test", ["b@example.com"], MSG)
    await session.close()
    assert result.replies["b@example.com"].code == 250
    assert mx.sessions[0].verbs[:3] == ["EHLO", "HELO", "MAIL"]


@pytest.mark.parametrize("reply", ["421 4.3.2 busy", "554 5.7.1 no thanks"])
async def test_smtp_14_no_helo_fallback_on_other_ehlo_errors(pki: TestPki, fake_mx: Any, reply: str) -> None:
    mx = await fake_mx(replies={"EHLO": reply})
    with pytest.raises(TransientDeliveryError) as info:  # SMTP-23: try the next host
        await open_session(mx, pki)
    assert info.value.reply.code == int(reply[:3])
    assert not mx.saw("HELO")


@pytest.mark.parametrize("greeting", ["421 4.3.2 try later", "554 5.3.2 not accepting mail"])
async def test_smtp_23_bad_greeting_is_host_specific(pki: TestPki, fake_mx: Any, greeting: str) -> None:
    mx = await fake_mx(greeting=greeting)
    with pytest.raises(TransientDeliveryError) as info:
        await open_session(mx, pki)
    assert info.value.reply.code == int(greeting[:3])
    assert mx.sessions[0].commands in ([], ["QUIT"])


async def test_smtp_23_connection_refused_is_transient(pki: TestPki) -> None:
    with socket.socket() as s:  # a port that was free a moment ago and has no listener
        s.bind((ADDR, 0))
        port = s.getsockname()[1]
    with pytest.raises(TransientDeliveryError) as info:
        await SmtpSession.open(address=ADDR, port=port, mx_host=MX, helo_name="relay.test", tls_mode=TlsMode.MAY,
                               ca_file=str(pki.ca_file), timeouts=FAST)
    assert info.value.reply.status == "4.4.1" and "refused" in info.value.reply.text.lower()


async def test_smtp_31_greeting_timeout(pki: TestPki, fake_mx: Any) -> None:
    mx = await fake_mx(stall_greeting=True)
    started = time.monotonic()
    with pytest.raises(TransientDeliveryError) as info:
        await open_session(mx, pki, timeouts=Timeouts(connect=1, greeting=0.3))
    assert time.monotonic() - started < 2.0
    assert info.value.reply.transient and "greeting" in info.value.reply.text


# --- the transaction (RFC 5321 §3.3, §4.2, §4.5.3) -----------------------------------------------

@pytest.mark.req("SMTP-17")
async def test_smtp_19_per_recipient_replies_in_one_transaction(pki: TestPki, fake_mx: Any) -> None:
    mx = await fake_mx(rcpt_replies={"gone@example.com": USER_UNKNOWN})
    session = await open_session(mx, pki)
    assert session.tls is None and not session.starttls_offered  # STS-84/85: plaintext when not offered
    result = await session.send("a@src.test", ["b@example.com", "gone@example.com", "c@example.com"], MSG)
    await session.close()
    assert result.replies["b@example.com"].code == 250 and result.replies["c@example.com"].code == 250
    gone = result.replies["gone@example.com"]
    assert gone.permanent and gone.status == "5.1.1"
    assert mx.messages[0].rcpt_tos == ["b@example.com", "c@example.com"]
    assert mx.sessions[0].verbs.count("MAIL") == 1 and mx.sessions[0].verbs.count("DATA") == 1  # SMTP-17


async def test_smtp_18_452_and_552_to_rcpt_are_temporary(pki: TestPki, fake_mx: Any) -> None:
    mx = await fake_mx(rcpt_replies={"full@example.com": "552 5.2.2 mailbox full"}, max_rcpts=2)
    session = await open_session(mx, pki)
    rcpts = ["full@example.com", "b@example.com", "c@example.com", "d@example.com"]
    result = await session.send("a@src.test", rcpts, MSG)
    await session.close()
    full, extra = result.replies["full@example.com"], result.replies["d@example.com"]
    assert full.code == 452 and full.transient and full.status == "4.2.2"
    assert extra.code == 452 and extra.transient
    assert result.replies["b@example.com"].code == 250 and result.replies["c@example.com"].code == 250


async def test_smtp_20_all_recipients_rejected_means_no_data(pki: TestPki, fake_mx: Any) -> None:
    mx = await fake_mx(rcpt_replies={"x@example.com": USER_UNKNOWN, "y@example.com": "450 4.2.1 try later"})
    session = await open_session(mx, pki)
    result = await session.send("a@src.test", ["x@example.com", "y@example.com"], MSG)
    assert result.data_reply is None
    assert result.replies["x@example.com"].permanent and result.replies["y@example.com"].transient
    assert await session.reset()  # the connection is still fine
    await session.close()
    assert not mx.saw("DATA") and mx.sessions[0].saw("RSET")


@pytest.mark.parametrize(("override", "reply"), [
    ("DATA_END", "554 5.6.0 content rejected"),
    ("DATA_END", "451 4.3.0 try again"),
    ("DATA", "554 5.5.1 no DATA for you"),
])
async def test_smtp_21_data_reply_applies_to_every_accepted_recipient(
        pki: TestPki, fake_mx: Any, override: str, reply: str) -> None:
    mx = await fake_mx(replies={override: reply}, rcpt_replies={"gone@example.com": USER_UNKNOWN})
    session = await open_session(mx, pki)
    result = await session.send("a@src.test", ["b@example.com", "c@example.com", "gone@example.com"], MSG)
    await session.close()
    code = int(reply[:3])
    assert result.replies["b@example.com"].code == code and result.replies["c@example.com"].code == code
    assert result.replies["gone@example.com"].status == "5.1.1"
    assert not mx.messages


@pytest.mark.parametrize("drop_at", ["RCPT", "DATA", "DATA_END"])
async def test_smtp_22_connection_lost_mid_transaction_is_temporary(
        pki: TestPki, fake_mx: Any, drop_at: str) -> None:
    mx = await fake_mx(drop_after=drop_at)
    session = await open_session(mx, pki)
    result = await session.send("a@src.test", ["b@example.com", "c@example.com"], MSG)
    for reply in result.replies.values():
        assert reply.code == 451 and reply.status == "4.4.2"
    assert not await session.reset() and not session.usable
    await session.close()


async def test_smtp_23_mail_4xx_raises_and_5xx_is_final(pki: TestPki, fake_mx: Any) -> None:
    mx = await fake_mx(replies={"MAIL": "451 4.3.0 local trouble"})
    session = await open_session(mx, pki)
    with pytest.raises(TransientDeliveryError) as info:
        await session.send("a@src.test", ["b@example.com"], MSG)
    assert info.value.reply.code == 451
    mx.replies["MAIL"] = "553 5.7.1 sender rejected"
    result = await session.send("a@src.test", ["b@example.com", "c@example.com"], MSG)
    await session.close()
    assert {r.code for r in result.replies.values()} == {553} and result.mail_reply is not None
    assert not mx.saw("RCPT")


async def test_smtp_32_no_final_reply_defers(pki: TestPki, fake_mx: Any) -> None:
    mx = await fake_mx(stall_at="DATA_END")
    session = await open_session(mx, pki, timeouts=Timeouts(connect=1, greeting=1, ehlo=1, mail=1, rcpt=1,
                                                            data_init=1, data_block=1, data_final=0.3))
    started = time.monotonic()
    result = await session.send("a@src.test", ["b@example.com"], MSG)
    assert time.monotonic() - started < 2.0
    assert result.replies["b@example.com"].transient and result.replies["b@example.com"].status == "4.4.2"
    await session.close()


async def test_smtp_31_data_init_timeout_defers(pki: TestPki, fake_mx: Any) -> None:
    mx = await fake_mx(stall_at="DATA")
    session = await open_session(mx, pki, timeouts=Timeouts(connect=1, greeting=1, ehlo=1, mail=1, rcpt=1,
                                                            data_init=0.3, data_block=5, data_final=5))
    started = time.monotonic()
    result = await session.send("a@src.test", ["b@example.com"], MSG)
    assert time.monotonic() - started < 2.0
    assert result.replies["b@example.com"].status == "4.4.2" and result.data_reply is None
    await session.close()


async def test_smtp_25_large_message_sent_in_blocks_intact(pki: TestPki, fake_mx: Any) -> None:
    lines = [(b"." if i % 7 == 0 else b"") + b"%06d " % i + b"x" * 90 for i in range(20000)]  # ~2 MB
    body = b"Subject: big\r\n\r\n" + b"\r\n".join(lines) + b"\r\n"
    mx = await fake_mx()
    session = await open_session(mx, pki)
    result = await session.send("a@src.test", ["b@example.com"], body)
    await session.close()
    assert result.replies["b@example.com"].code == 250
    assert mx.messages[0].data == body


async def test_smtp_29_size_declared_and_oversize_not_sent(pki: TestPki, fake_mx: Any) -> None:
    mx = await fake_mx(size_limit=1000)
    session = await open_session(mx, pki)
    assert session.peer_size_limit == 1000
    result = await session.send("a@src.test", ["b@example.com"], MSG)
    assert result.replies["b@example.com"].code == 250
    assert f"SIZE={len(MSG)}" in mx.messages[0].mail_options
    big = MSG + b"x" * 2000 + b"\r\n"
    result = await session.send("a@src.test", ["b@example.com", "c@example.com"], big)
    await session.close()
    assert {(r.code, r.status) for r in result.replies.values()} == {(552, "5.3.4")}
    assert mx.sessions[0].verbs.count("MAIL") == 1  # the big one was never offered


@pytest.mark.parametrize("offered", [False, True])
async def test_smtp_30_eight_bit_needs_8bitmime(pki: TestPki, fake_mx: Any, offered: bool) -> None:
    body = "Subject: caf\u00e9\r\n\r\nd\u00e9j\u00e0 vu\r\n".encode()
    mx = await fake_mx(eightbitmime=offered)
    session = await open_session(mx, pki)
    result = await session.send("a@src.test", ["b@example.com"], body, eight_bit=True)
    await session.close()
    if not offered:  # decision: bounce rather than downgrade or send raw 8-bit
        assert result.replies["b@example.com"].permanent and result.replies["b@example.com"].status == "5.6.3"
        assert not mx.saw("MAIL")
    else:
        assert result.replies["b@example.com"].code == 250
        assert "BODY=8BITMIME" in mx.messages[0].mail_options and mx.messages[0].data == body


@pytest.mark.parametrize("offered", [False, True])
async def test_smtp_30_smtputf8_address_needs_smtputf8(pki: TestPki, fake_mx: Any, offered: bool) -> None:
    rcpt = "j\u00f6rg@example.com"
    mx = await fake_mx(smtputf8=offered)
    session = await open_session(mx, pki)
    result = await session.send("a@src.test", [rcpt], MSG, smtputf8=True)
    await session.close()
    if not offered:
        assert result.replies[rcpt].permanent and result.replies[rcpt].status == "5.6.7"
        assert not mx.saw("MAIL")
    else:
        assert result.replies[rcpt].code == 250 and mx.messages[0].rcpt_tos == [rcpt]
        assert "SMTPUTF8" in mx.messages[0].mail_options


async def test_smtp_25_dot_stuffing_and_smtp_26_line_endings(pki: TestPki, fake_mx: Any) -> None:
    mx = await fake_mx()
    session = await open_session(mx, pki)
    body = b"Subject: dots\n\n.hidden\n.\n..two\r\nbare cr\rend"
    result = await session.send("a@src.test", ["b@example.com"], body)
    await session.close()
    assert result.replies["b@example.com"].code == 250
    assert mx.messages[0].data == b"Subject: dots\r\n\r\n.hidden\r\n.\r\n..two\r\nbare cr\r\nend\r\n"


async def test_connection_reuse_two_transactions_one_session(pki: TestPki, fake_mx: Any) -> None:
    mx = await fake_mx(tls_context=pki.leaf(MX).server_context())
    session = await open_session(mx, pki, TlsMode.VERIFY)
    first = await session.send("a@src.test", ["b@example.com"], MSG)
    before = session.last_used
    assert await session.reset()
    second = await session.send("", ["c@example.com"], MSG)  # a bounce: null reverse-path
    await session.close()
    assert first.replies["b@example.com"].code == 250 and second.replies["c@example.com"].code == 250
    assert session.last_used >= before
    [rec] = await mx.wait_for_sessions(1, closed=True)
    assert len(rec.messages) == 2 and rec.verbs.count("STARTTLS") == 1
    assert [m.mail_from for m in mx.messages] == ["a@src.test", "<>"]


async def test_relayhost_login(pki: TestPki, fake_mx: Any) -> None:
    mx = await fake_mx(tls_context=pki.leaf(MX).server_context(), credentials={"relay": "s3cret"})
    session = await open_session(mx, pki, TlsMode.VERIFY)
    await session.login("relay", "s3cret")
    await session.close()
    assert mx.sessions[0].auth_user == "relay"
    session = await open_session(mx, pki, TlsMode.VERIFY)
    with pytest.raises(TransientDeliveryError) as info:
        await session.login("relay", "wrong")
    await session.close()
    assert info.value.reply.code == 535
