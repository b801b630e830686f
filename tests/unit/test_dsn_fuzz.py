"""Property tests of the DSN builder (DSN-1, DSN-2, DSN-5, DSN-6, SMTP-40/42).

1. Any bytes as the original message: the build never fails, the wire form holds, and part 3 is the
   original's header section (independently recomputed here).
2. Arbitrary addresses, statuses, texts and dates: only ValueError may escape; whatever is built
   parses back with one block per recipient and round-trips the recipient addresses.

Each test prints how many examples were built and rejected (run pytest with -s to see them).
"""

from __future__ import annotations

import email
import email.policy
import re
from collections import Counter
from datetime import UTC, datetime, timedelta, timezone
from email.message import Message

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mta.delivery.dsn import FailedRecipient, build_dsn

FUZZ = settings(max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
NOW = datetime(2024, 5, 6, 9, 30, tzinfo=UTC)
VALID = FailedRecipient("bob@dest.example", "5.1.1", remote_mta="mx1.dest.example", diagnostic="550 5.1.1 gone")

line_end = st.sampled_from([b"\r\n", b"\n", b"\r", b""])
header_line = st.builds(lambda name, value, end: name + b": " + value + end,
                        st.binary(min_size=1, max_size=20), st.binary(max_size=1200), line_end)
header_like = st.builds(lambda lines, sep, body: b"".join(lines) + sep + body,
                        st.lists(header_line, max_size=8), st.sampled_from([b"", b"\r\n", b"\n", b"\r\n\r\n"]),
                        st.binary(max_size=200))
originals = st.one_of(st.binary(max_size=3000), header_like)


def parse_compat(raw: bytes) -> Message:
    """compat32 keeps field values as sent (no RFC 2047 decoding), which a round trip needs."""
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    assert not msg.defects, msg.defects
    return msg


def subparts(msg: Message) -> list[Message]:
    payload = msg.get_payload()
    assert isinstance(payload, list)
    found = [p for p in payload if isinstance(p, Message)]
    assert len(found) == len(payload)
    return found


def unfold(value: str) -> str:
    return re.sub(r"\r?\n(?=[ \t])", "", value)


def assert_wire_form(raw: bytes) -> None:
    assert raw.endswith(b"\r\n")
    assert b"\r" not in raw.replace(b"\r\n", b"") and b"\n" not in raw.replace(b"\r\n", b"")
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998


def expected_header_lines(original: bytes) -> list[bytes]:
    """Lines up to the first empty line; a line ends at CRLF, CR or LF (independent of dsn.py)."""
    lines: list[bytes] = []
    pos = 0
    for m in re.finditer(rb"\r\n|\r|\n", original):
        if m.start() == pos:
            return lines
        lines.append(original[pos : m.start()])
        pos = m.end()
    if pos < len(original):
        lines.append(original[pos:])
    return lines


def third_part_lines(raw: bytes) -> list[bytes]:
    msg = parse_compat(raw)
    third = subparts(msg)[2]
    assert third.get_content_type() == "text/rfc822-headers"
    data = third.get_payload(decode=True)
    assert isinstance(data, bytes)
    return data.splitlines()


def test_dsn_2_fuzz_any_original_builds_and_returns_its_header_section() -> None:
    counts: Counter[str] = Counter()

    @FUZZ
    @given(original=originals)
    def run(original: bytes) -> None:
        raw = build_dsn(reporting_mta="mx.relay.example", original_sender="alice@sender.example", original=original,
                        recipients=[VALID], arrival=NOW, now=NOW, message_id="<d@mx.relay.example>")
        counts["built"] += 1
        counts["qp" if b"quoted-printable" in raw.split(b"text/rfc822-headers", 1)[1][:200] else "7bit"] += 1
        assert_wire_form(raw)
        assert raw.split(b"\r\n\r\n", 1)[1].isascii()
        assert third_part_lines(raw) == expected_header_lines(original)

    run()
    print(f"\nDSN-2 fuzz (original bytes): {dict(counts)}")
    assert counts["built"] >= 100
    assert counts["qp"] > 0 and counts["7bit"] > 0


def test_dsn_2_fuzz_header_cap_keeps_whole_lines_within_cap() -> None:
    counts: Counter[str] = Counter()

    @FUZZ
    @given(original=header_like, cap=st.integers(min_value=1, max_value=3000))
    def run(original: bytes, cap: int) -> None:
        raw = build_dsn(reporting_mta="mx.relay.example", original_sender="alice@sender.example", original=original,
                        recipients=[VALID], arrival=NOW, now=NOW, message_id="<d@mx.relay.example>", max_headers=cap)
        assert_wire_form(raw)
        got = third_part_lines(raw)
        full = expected_header_lines(original)
        counts["cut" if got != full else "whole"] += 1
        assert sum(len(line) + 1 for line in got) <= cap + 1  # + the line end of the last kept line
        assert got[:-1] == full[: len(got) - 1]
        if got:
            assert full[len(got) - 1].startswith(got[-1])

    run()
    print(f"\nDSN-2 fuzz (header cap): {dict(counts)}")
    assert counts["cut"] > 0 and counts["whole"] > 0


def decode_xtext(value: str) -> str:
    return re.sub(r"\\x\{([0-9A-F]{2,6})\}", lambda m: chr(int(m.group(1), 16)), value)


addresses = st.one_of(
    st.text(max_size=60),
    st.emails(),
    st.builds(lambda local, domain: f"{local}@{domain}", st.text(min_size=1, max_size=30),
              st.text(min_size=1, max_size=30)),
    st.sampled_from(["<>", "", "<@a.example,@b.example:u@d.example>", "jörg@bücher.example", '"a b"@x.example']),
)
statuses = st.one_of(st.sampled_from(["5.1.1", "4.4.7", "2.0.0", "5.1.10", "5.7.10"]), st.text(max_size=12))
zones = st.sampled_from([UTC, timezone(timedelta(hours=-7)), timezone(timedelta(hours=5, minutes=30))])
dates = st.datetimes(
    min_value=datetime(1970, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.one_of(st.none(), zones)
)
any_recipient = st.builds(
    FailedRecipient,
    address=addresses,
    status=statuses,
    action=st.sampled_from(["failed", "delayed", "delivered", "relayed", "expanded", "bounced"]),
    remote_mta=st.none() | st.sampled_from(["mx1.dest.example", "[192.0.2.25]", "mx.bücher.example"]) | st.text(),
    diagnostic=st.none() | st.text(max_size=2000),
    last_attempt=st.none() | dates,
    reason=st.text(max_size=300),
    will_retry_until=st.none() | dates,
)
# Mostly coherent action/status pairs, so that many examples get past validation.
coherent = st.sampled_from([("failed", "5.1.1"), ("failed", "5.7.10"), ("delayed", "4.4.7"), ("delivered", "2.0.0")])
plausible_recipient = st.builds(
    lambda pair, **kw: FailedRecipient(action=pair[0], status=pair[1], **kw),
    coherent,
    address=st.one_of(st.emails(), st.text(min_size=1, max_size=40).map(lambda s: s + "@dest.example"), addresses),
    remote_mta=st.none() | st.sampled_from(["mx1.dest.example", "[192.0.2.25]", "mx.bücher.example"]),
    diagnostic=st.none() | st.text(max_size=2000),
    last_attempt=st.none() | dates,
    reason=st.text(max_size=300),
    will_retry_until=st.none() | dates,
)
recipients = st.one_of(plausible_recipient, plausible_recipient, plausible_recipient, any_recipient)
senders = st.one_of(st.emails(), st.sampled_from(["alice@sender.example", "jörg@bücher.example"]), addresses)


def test_dsn_fuzz_arbitrary_fields_only_value_error() -> None:
    counts: Counter[str] = Counter()

    @FUZZ
    @given(
        reporting_mta=st.one_of(st.just("mx.relay.example"), st.just("relais.bücher.example"), st.text(max_size=40)),
        sender=senders,
        rcpts=st.one_of(st.lists(recipients, min_size=1, max_size=3), st.just([])),
        original=originals,
        arrival=dates,
        now=dates,
        message_id=st.one_of(st.just("<d@mx.relay.example>"), st.just("x@y"), st.text(max_size=40)),
    )
    def run(reporting_mta: str, sender: str, rcpts: list[FailedRecipient], original: bytes,
            arrival: datetime, now: datetime, message_id: str) -> None:
        try:
            raw = build_dsn(reporting_mta=reporting_mta, original_sender=sender, original=original,
                            recipients=rcpts, arrival=arrival, now=now, message_id=message_id)
        except ValueError:
            counts["rejected (ValueError)"] += 1
            return
        counts["built"] += 1
        assert_wire_form(raw)
        msg = parse_compat(raw)
        status = subparts(msg)[1]
        assert status.get_content_type() == "message/delivery-status"
        blocks = subparts(status)
        assert len(blocks) == len(rcpts) + 1  # DSN-5: one block per recipient
        body = raw.split(b"\r\n\r\n", 1)[1]
        assert body.isascii()  # DSN-6 (and 7-bit bodies throughout)
        for rcpt, block in zip(rcpts, blocks[1:], strict=True):
            typ, _, value = unfold(block["Final-Recipient"]).partition("; ")
            expected = rcpt.address.strip().removeprefix("<").removesuffix(">").strip()
            assert (decode_xtext(value) if typ == "utf-8" else value) == expected
            assert block["Status"] == rcpt.status and block["Action"] == rcpt.action

    run()
    print(f"\nDSN fuzz (arbitrary fields): {dict(counts)}")
    assert counts["built"] >= 20
    assert counts["rejected (ValueError)"] >= 20
