"""MAIL/RCPT command text (mta.delivery.wire, PERF-6) against what aiosmtplib's `mail()`/`rcpt()` put
on a real socket: byte for byte the same for every address aiosmtplib sends unchanged, the same
refusal (raised before anything is written) for every address that cannot be sent, and the stored
address kept where aiosmtplib's parseaddr would rewrite it. Then the refusal as SmtpSession gives it:
553 with nothing of the message sent, the other recipients delivered (pipelined batch validated first).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import aiosmtplib
import pytest

from mta.delivery.smtp_client import SmtpSession, Timeouts, TlsMode
from mta.delivery.wire import mail_command, rcpt_command
from tests.support.scripted_mx import ScriptedMx

ADDR = "127.0.0.45"
ATEXT = "abcxyzABCXYZ0189!#$%&'*+-/=?^_`{|}~"
QTEXT = "abc XYZ 019 !#$%&'()*+,-./:;<=>?@[]^_`{|}~"
OPTIONS = [[], ["SIZE=1234"], ["SIZE=99", "BODY=8BITMIME"], ["BODY=8BITMIME", "SMTPUTF8"]]


def _local(rng: random.Random, utf8: bool) -> str:
    kind = rng.choice(["atoms", "tag", "quoted", "utf8" if utf8 else "atoms"])
    if kind == "quoted":
        pairs = ['\\"', "\\\\"]  # quoted-pairs: \" and \\
        parts = [rng.choice(QTEXT) if rng.random() > 0.15 else rng.choice(pairs) for _ in range(rng.randint(0, 12))]
        return '"' + "".join(parts) + '"'
    if kind == "utf8":
        return rng.choice(["jörg", "用户", "δοκιμή", "test.ünï"]) + rng.choice(["", "+tag", ".x"])
    atoms = ["".join(rng.choice(ATEXT) for _ in range(rng.randint(1, 8))) for _ in range(rng.randint(1, 3))]
    local = ".".join(atoms)
    return local + "+" + "".join(rng.choice(ATEXT) for _ in range(rng.randint(0, 6))) if kind == "tag" else local


def _domain(rng: random.Random, utf8: bool) -> str:
    kind = rng.choice(["plain", "literal", "idn" if utf8 else "punycode"])
    if kind == "literal":
        return rng.choice(["[127.0.0.1]", "[IPv6:::1]", "[192.0.2.55]"])
    if kind == "idn":
        return rng.choice(["bücher.example", "例子.广告", "xn--bcher-kva.example", "münchen.de"])
    labels = ["".join(rng.choice("abcdefghij0123456789-") for _ in range(rng.randint(1, 10))).strip("-") or "a"
              for _ in range(rng.randint(1, 3))]
    return ".".join([*labels, rng.choice(["com", "test", "example"])])


def good_addresses(n: int = 300) -> list[tuple[str, bool]]:
    """(address, smtputf8) pairs from the RFC 5321/6531 mailbox grammar, plus the null sender."""
    rng = random.Random(20920)
    out = [("", False), ("", True)]
    for _ in range(n):
        utf8 = rng.random() < 0.3
        out.append((_local(rng, utf8) + "@" + _domain(rng, utf8), utf8))
    return out


def bad_addresses(n: int = 150) -> list[tuple[str, bool]]:
    """Addresses with something that would break the command line, or non-ASCII without SMTPUTF8."""
    rng = random.Random(2821)
    poison = ["\r\n", "\n", "\r", "\x00", "\t", "\x7f", "\x1b", " ", "<", ">", "\u2028", "\xa0"]
    out: list[tuple[str, bool]] = [("jörg@example.com", False), ("a@bücher.example", False), ('"a\r\nb"@x.test', True)]
    for _ in range(n):
        utf8 = rng.random() < 0.3
        address = _local(rng, utf8) + "@" + _domain(rng, utf8)
        at = rng.randint(0, len(address))
        out.append((address[:at] + rng.choice(poison) + address[at:], utf8))
    return out


class _Recorder(asyncio.Protocol):
    """Answers 250 to every line and keeps the lines (a loopback MX for aiosmtplib)."""

    def __init__(self, lines: list[bytes]) -> None:
        self.lines = lines
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        transport.write(b"220 rec.test\r\n")  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            self.lines.append(line + b"\r\n")
            ehlo = line.upper().startswith(b"EHLO")
            self.transport.write(b"250-rec.test\r\n250 SMTPUTF8\r\n" if ehlo else b"250 ok\r\n")  # type: ignore[attr-defined]


@pytest.fixture
async def library() -> AsyncIterator[tuple[aiosmtplib.SMTP, list[bytes]]]:
    lines: list[bytes] = []
    server = await asyncio.get_running_loop().create_server(lambda: _Recorder(lines), ADDR, 0)
    smtp = aiosmtplib.SMTP(hostname=ADDR, port=server.sockets[0].getsockname()[1], start_tls=False, timeout=5)
    await smtp.connect()
    await smtp.ehlo(hostname="relay.test")
    try:
        yield smtp, lines
    finally:
        smtp.close()
        server.close()


async def _aiosmtplib_sends(smtp: aiosmtplib.SMTP, lines: list[bytes], verb: str, address: str,
                            options: list[str], utf8: bool) -> bytes | Exception:
    """The line aiosmtplib wrote for mail()/rcpt(), or the exception it raised (nothing written then)."""
    before = len(lines)
    encoding = "utf-8" if utf8 else "ascii"
    try:
        if verb == "MAIL":
            await smtp.mail(address, options=options, encoding=encoding)
        else:
            await smtp.rcpt(address, encoding=encoding)
    except ValueError as exc:
        assert len(lines) == before, "aiosmtplib wrote something before refusing"
        return exc
    [line] = lines[before:]
    return line


def _ours(verb: str, address: str, options: list[str], utf8: bool) -> bytes | Exception:
    try:
        return mail_command(address, options, utf8) if verb == "MAIL" else rcpt_command(address, utf8)
    except ValueError as exc:
        return exc


async def test_perf_6_command_bytes_equal_aiosmtplib_for_valid_mailboxes(
        library: tuple[aiosmtplib.SMTP, list[bytes]]) -> None:
    smtp, lines = library
    for i, (address, utf8) in enumerate(good_addresses()):
        options = [o for o in OPTIONS[i % len(OPTIONS)] if utf8 or o != "SMTPUTF8"]
        for verb in ("MAIL", "RCPT"):
            theirs = await _aiosmtplib_sends(smtp, lines, verb, address, options, utf8)
            assert _ours(verb, address, options, utf8) == theirs, (verb, address)
            assert isinstance(theirs, bytes) and f"<{address}>".encode() in theirs  # sent as stored


async def test_perf_6_bad_addresses_refused_like_aiosmtplib(library: tuple[aiosmtplib.SMTP, list[bytes]]) -> None:
    smtp, lines = library
    refused = rewritten = 0
    for address, utf8 in bad_addresses():
        for verb in ("MAIL", "RCPT"):
            ours = _ours(verb, address, [], utf8)
            theirs = await _aiosmtplib_sends(smtp, lines, verb, address, [], utf8)
            if isinstance(theirs, ValueError):  # refused, nothing written: ours refuses it the same way
                assert isinstance(ours, ValueError), (verb, address, ours)
                assert isinstance(ours, UnicodeError) == isinstance(theirs, UnicodeError), (address, ours, theirs)
                refused += 1
            elif f"<{address}>".encode() in theirs:  # harmless after all (e.g. a space inside quotes)
                assert ours == theirs, (verb, address)
            else:  # aiosmtplib's parseaddr rewrote it: ours refuses it or sends it as stored
                stored = f"{verb} {'FROM' if verb == 'MAIL' else 'TO'}:<{address}>\r\n".encode()
                assert isinstance(ours, ValueError) or ours == stored, (verb, address, ours, theirs)
                rewritten += 1
    assert refused > 100 and rewritten > 0, (refused, rewritten)  # both kinds were met


@pytest.mark.parametrize(("stored", "aiosmtplib_sends"), [
    ("a(comment)@x.test", b"<a@x.test>"),
    ("a,b@x.test", b"<a>"),
    ("a;b@x.test", b"<a>"),
])
async def test_perf_6_addresses_aiosmtplib_rewrites_go_out_as_stored(
        library: tuple[aiosmtplib.SMTP, list[bytes]], stored: str, aiosmtplib_sends: bytes) -> None:
    """Accepted at submission (mta.submission.handler.valid_address) and sent as stored: aiosmtplib
    would have sent mail for somebody else."""
    smtp, lines = library
    theirs = await _aiosmtplib_sends(smtp, lines, "RCPT", stored, [], False)
    assert theirs == b"RCPT TO:" + aiosmtplib_sends + b"\r\n"
    assert rcpt_command(stored, False) == f"RCPT TO:<{stored}>\r\n".encode()


FAST = Timeouts(connect=2, greeting=2, ehlo=2, mail=2, rcpt=2, data_init=2, data_block=2, data_final=2)


@pytest.mark.parametrize("pipelining", [True, False])
async def test_perf_6_invalid_address_is_553_before_anything_is_sent(pipelining: bool) -> None:
    async with ScriptedMx(ADDR, pipelining=pipelining) as mx:
        session = await SmtpSession.open(address=ADDR, port=mx.port, mx_host="mx.test", helo_name="relay.test",
                                         tls_mode=TlsMode.MAY, ca_file=None, timeouts=FAST)
        bad = "evil@x.test>\r\nRSET"
        result = await session.send("s@src.test", [bad, "ok@x.test", "jörg@x.test"], b"Subject: x\r\n\r\nhi\r\n")
        assert (result.replies[bad].code, result.replies[bad].status) == (553, "5.1.3")
        assert result.replies["jörg@x.test"].status == "5.6.7"  # non-ASCII without SMTPUTF8
        assert result.replies["ok@x.test"].code == 250
        only_bad = await session.send("s@src.test", [bad], b"x\r\n")
        bad_sender = await session.send("s@src\n.test", ["ok@x.test"], b"x\r\n")
        assert only_bad.replies[bad].code == 553 and bad_sender.replies["ok@x.test"].status == "5.1.7"
        assert session.usable and session.idle
        await session.close()
    [conv] = mx.conversations
    assert [m for m in conv.commands if m.startswith((b"MAIL", b"RCPT"))] == [
        b"MAIL FROM:<s@src.test> SIZE=18", b"RCPT TO:<ok@x.test>"]  # nothing of the bad ones went out
