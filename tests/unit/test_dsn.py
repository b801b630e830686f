"""DSN builder: the bounce is parsed back with the email package and checked field by field
(DSN-1..7, DSN-11, DSN-13, SMTP-39..42)."""

from __future__ import annotations

import email
import email.policy
import re
from datetime import UTC, datetime, timedelta, timezone
from email.message import EmailMessage, Message
from email.utils import parsedate_to_datetime

import pytest

from mta.delivery.dsn import (
    SUBJECT_DELAYED,
    SUBJECT_FAILED,
    FailedRecipient,
    bounce_recipient,
    build_dsn,
    should_bounce,
)

ARRIVAL = datetime(2024, 5, 1, 9, 30, tzinfo=UTC)
NOW = datetime(2024, 5, 6, 9, 30, tzinfo=UTC)
ORIGINAL = (
    b"Received: from client.example ([192.0.2.7]) by mx.relay.example; Wed, 1 May 2024 09:30:00 +0000\r\n"
    b"From: Alice <alice@sender.example>\r\n"
    b"To: bob@dest.example\r\n"
    b"Subject: quarterly numbers\r\n"
    b"Message-ID: <orig-1@sender.example>\r\n"
    b"\r\n"
    b"The body must not be returned.\r\n"
)
UNKNOWN_USER = FailedRecipient(
    address="bob@dest.example",
    status="5.1.1",
    remote_mta="mx1.dest.example",
    diagnostic="550 5.1.1 <bob@dest.example>: no such user",
    last_attempt=NOW,
    reason="The recipient's mail server says the mailbox does not exist.",
)


def build(**overrides: object) -> bytes:
    args: dict[str, object] = {
        "reporting_mta": "mx.relay.example",
        "original_sender": "alice@sender.example",
        "original": ORIGINAL,
        "recipients": [UNKNOWN_USER],
        "arrival": ARRIVAL,
        "now": NOW,
        "message_id": "<dsn-1@mx.relay.example>",
    }
    args.update(overrides)
    return build_dsn(**args)  # type: ignore[arg-type]


def parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    assert not msg.defects, msg.defects
    return msg


def parts(msg: EmailMessage) -> list[EmailMessage]:
    payload = msg.get_payload()
    assert isinstance(payload, list)
    found = [p for p in payload if isinstance(p, EmailMessage)]
    assert len(found) == len(payload)
    return found


def blocks(msg: EmailMessage) -> list[Message]:
    status = parts(msg)[1]
    payload = status.get_payload()
    assert isinstance(payload, list)
    found = [b for b in payload if isinstance(b, Message)]
    assert len(found) == len(payload)
    return found


def part2_bytes(raw: bytes) -> bytes:
    """The raw body of the message/delivery-status part, as sent."""
    m = re.search(rb"Content-Type: message/delivery-status\r\n\r\n(.*?)\r\n--dsn\.", raw, re.S)
    assert m, raw
    return m.group(1)


def assert_wire_form(raw: bytes) -> None:
    """Every line CRLF-terminated and at most 998 octets (RFC 5322 §2.1.1)."""
    assert raw.endswith(b"\r\n")
    assert b"\r" not in raw.replace(b"\r\n", b"")
    assert b"\n" not in raw.replace(b"\r\n", b"")
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998


def decode_xtext(value: str) -> str:
    return re.sub(r"\\x\{([0-9A-F]{2,6})\}", lambda m: chr(int(m.group(1), 16)), value)


def test_dsn_1_top_level_is_multipart_report_delivery_status() -> None:
    msg = parse(build())
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg.get_boundary()


def test_dsn_2_three_parts_human_status_headers() -> None:
    msg = parse(build())
    types = [p.get_content_type() for p in parts(msg)]
    assert types == ["text/plain", "message/delivery-status", "text/rfc822-headers"]


def test_dsn_2_third_part_is_the_original_header_section_without_body() -> None:
    third = parts(parse(build()))[2]
    text = third.get_payload(decode=True)
    assert isinstance(text, bytes)
    assert text.splitlines() == ORIGINAL.split(b"\r\n\r\n")[0].split(b"\r\n")
    assert b"must not be returned" not in text


def test_dsn_3_smtp_39_headers_from_postmaster_to_sender() -> None:
    msg = parse(build())
    assert msg["From"].addresses[0].display_name == "Mail Delivery System"
    assert msg["From"].addresses[0].addr_spec == "MAILER-DAEMON@mx.relay.example"
    assert msg["To"].addresses[0].addr_spec == "alice@sender.example"
    assert msg["Subject"] == SUBJECT_FAILED
    assert parsedate_to_datetime(msg["Date"]) == NOW
    assert msg["Message-ID"] == "<dsn-1@mx.relay.example>"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["MIME-Version"] == "1.0"


def test_dsn_3_message_id_without_brackets_gets_them() -> None:
    assert parse(build(message_id="x.y@relay.example"))["Message-ID"] == "<x.y@relay.example>"


@pytest.mark.parametrize("bad", ["", "no-at-sign", "a b@c", "<a@b>\r\nBcc: x@y", "(comment)@x"])
def test_dsn_3_bad_message_id_rejected(bad: str) -> None:
    with pytest.raises(ValueError):
        build(message_id=bad)


def test_dsn_4_per_message_block() -> None:
    first = blocks(parse(build()))[0]
    assert first["Reporting-MTA"] == "dns; mx.relay.example"
    assert parsedate_to_datetime(first["Arrival-Date"]) == ARRIVAL
    assert first["Final-Recipient"] is None  # recipient fields live in their own blocks


def test_dsn_4_reporting_mta_idn_becomes_a_label() -> None:
    msg = parse(build(reporting_mta="relais.bücher.example"))
    assert blocks(msg)[0]["Reporting-MTA"] == "dns; relais.xn--bcher-kva.example"
    assert msg["From"].addresses[0].domain == "relais.xn--bcher-kva.example"


@pytest.mark.parametrize("bad", ["", "bad host", "a..b", "-x.example", "x" * 64 + ".example"])
def test_dsn_4_bad_reporting_mta_rejected(bad: str) -> None:
    with pytest.raises(ValueError):
        build(reporting_mta=bad)


def test_dsn_5_dsn_7_unknown_user_block() -> None:
    rcpt = blocks(parse(build()))[1]
    assert rcpt["Final-Recipient"] == "rfc822; bob@dest.example"
    assert rcpt["Action"] == "failed"
    assert rcpt["Status"] == "5.1.1"
    assert rcpt["Remote-MTA"] == "dns; mx1.dest.example"
    assert rcpt["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@dest.example>: no such user"
    assert parsedate_to_datetime(rcpt["Last-Attempt-Date"]) == NOW
    assert rcpt["Will-Retry-Until"] is None


def test_dsn_7_null_mx_has_no_remote_mta() -> None:
    null_mx = FailedRecipient("carol@nomail.example", "5.1.10", reason="nomail.example accepts no mail (null MX)")
    rcpt = blocks(parse(build(recipients=[null_mx])))[1]
    assert rcpt["Status"] == "5.1.10"
    assert rcpt["Remote-MTA"] is None
    assert rcpt["Diagnostic-Code"] is None
    assert rcpt["Last-Attempt-Date"] is None


def test_dsn_7_sts_give_up_names_policy_in_human_part() -> None:
    sts = FailedRecipient(
        "dave@strict.example", "5.7.10",
        reason="MTA-STS policy of strict.example (enforce): no MX host matches the policy",
    )
    text = parts(parse(build(recipients=[sts])))[0].get_content()
    assert "MTA-STS policy of strict.example (enforce)" in text
    assert "dave@strict.example" in text
    assert "5.7.10" in text


def test_dsn_5_dsn_11_one_block_per_recipient_in_order() -> None:
    second = FailedRecipient("erin@dest.example", "5.2.2", remote_mta="mx2.dest.example", diagnostic="552 full")
    found = blocks(parse(build(recipients=[UNKNOWN_USER, second])))
    assert len(found) == 3
    assert [b["Final-Recipient"] for b in found[1:]] == ["rfc822; bob@dest.example", "rfc822; erin@dest.example"]
    assert found[2]["Remote-MTA"] == "dns; mx2.dest.example"


def test_dsn_5_dsn_13_delay_warning() -> None:
    until = NOW + timedelta(days=3)
    delayed = FailedRecipient("bob@dest.example", "4.4.1", action="delayed", will_retry_until=until,
                              remote_mta="mx1.dest.example", diagnostic="421 4.4.1 try later")
    msg = parse(build(recipients=[delayed]))
    assert msg["Subject"] == SUBJECT_DELAYED
    rcpt = blocks(msg)[1]
    assert rcpt["Action"] == "delayed"
    assert rcpt["Status"] == "4.4.1"
    assert parsedate_to_datetime(rcpt["Will-Retry-Until"]) == until
    assert "still trying" in parts(msg)[0].get_content()


def test_dsn_5_mixed_failed_and_delayed_subject_is_failure() -> None:
    delayed = FailedRecipient("erin@dest.example", "4.4.1", action="delayed")
    assert parse(build(recipients=[delayed, UNKNOWN_USER]))["Subject"] == SUBJECT_FAILED


def test_dsn_5_will_retry_until_only_for_delayed() -> None:
    failed = FailedRecipient("bob@dest.example", "5.4.7", will_retry_until=NOW)
    assert blocks(parse(build(recipients=[failed])))[1]["Will-Retry-Until"] is None


@pytest.mark.parametrize(
    ("status", "action"),
    [("4.4.7", "failed"), ("5.4.7", "delayed"), ("5.1.1", "delivered"), ("5.1", "failed"),
     ("5.1.1.1", "failed"), ("6.1.1", "failed"), ("5.1.1", "bounced"), ("5.1.1 ", "failed"),
     ("5.\u0661.\u0661", "failed")],  # Arabic-Indic digits are digits to \d, not to RFC 3463
)
def test_dsn_5_status_must_be_rfc3463_and_fit_action(status: str, action: str) -> None:
    with pytest.raises(ValueError):
        build(recipients=[FailedRecipient("bob@dest.example", status, action=action)])


def test_dsn_6_part2_is_us_ascii_and_non_ascii_address_uses_utf8_xtext() -> None:
    rcpt = FailedRecipient("jürgen+tag@bücher.example", "5.1.1", diagnostic="550 5.1.1 Empfänger unbekannt")
    raw = build(recipients=[rcpt])
    assert part2_bytes(raw).isascii()
    block = blocks(parse(raw))[1]
    typ, _, value = block["Final-Recipient"].partition("; ")
    assert typ == "utf-8"
    assert "+" not in value and "ü" not in value  # "+" is not a QCHAR (RFC 6533)
    assert decode_xtext(value) == "jürgen+tag@bücher.example"
    assert block["Diagnostic-Code"] == "smtp; 550 5.1.1 Empf\\x{E4}nger unbekannt"


def test_dsn_6_backslash_in_diagnostic_is_escaped() -> None:
    rcpt = FailedRecipient("bob@dest.example", "5.1.1", diagnostic="550 C:\\x{41}")
    value = blocks(parse(build(recipients=[rcpt])))[1]["Diagnostic-Code"]
    assert value == "smtp; 550 C:\\x{5C}x{41}"
    assert decode_xtext(value) == "smtp; 550 C:\\x{41}"


def test_dsn_6_long_diagnostic_is_folded_within_998_and_unfolds_back() -> None:
    words = " ".join(f"word{i}" for i in range(150))
    rcpt = FailedRecipient("bob@dest.example", "5.7.1", diagnostic=f"550 5.7.1 {words}")
    raw = build(recipients=[rcpt])
    assert_wire_form(raw)
    assert max(len(line) for line in part2_bytes(raw).split(b"\r\n")) <= 78
    assert blocks(parse(raw))[1]["Diagnostic-Code"] == f"smtp; 550 5.7.1 {words}"


def test_dsn_6_unbreakable_diagnostic_is_cut_to_fit_a_line() -> None:
    rcpt = FailedRecipient("bob@dest.example", "5.7.1", diagnostic="550 " + "x" * 5000)
    raw = build(recipients=[rcpt])
    assert_wire_form(raw)
    value = blocks(parse(raw))[1]["Diagnostic-Code"]
    assert value.startswith("smtp; 550 xxx") and value.endswith("...")


def test_dsn_6_diagnostic_line_breaks_cannot_inject_fields() -> None:
    rcpt = FailedRecipient("bob@dest.example", "5.1.1", diagnostic="550 no\r\nAction: delivered\r\nStatus: 2.0.0")
    block = blocks(parse(build(recipients=[rcpt])))[1]
    assert block["Action"] == "failed"
    assert block.get_all("Status") == ["5.1.1"]
    assert block["Diagnostic-Code"] == "smtp; 550 no Action: delivered Status: 2.0.0"


def test_dsn_6_typed_diagnostic_is_not_typed_twice() -> None:
    rcpt = FailedRecipient("bob@dest.example", "5.1.1", diagnostic="smtp; 550 5.1.1 gone")
    assert blocks(parse(build(recipients=[rcpt])))[1]["Diagnostic-Code"] == "smtp; 550 5.1.1 gone"


def test_dsn_6_recipient_too_long_for_a_line_rejected() -> None:
    with pytest.raises(ValueError):
        build(recipients=[FailedRecipient("ü" * 200 + "@dest.example", "5.1.1")])


@pytest.mark.parametrize("literal", ["[2001:db8::25]", "[IPv6:2001:DB8::25]", "2001:db8:0::25"])
def test_dsn_6_remote_mta_ip_literal_accepted(literal: str) -> None:
    rcpt = FailedRecipient("bob@dest.example", "5.1.1", remote_mta=literal)
    assert blocks(parse(build(recipients=[rcpt])))[1]["Remote-MTA"] == "dns; 2001:db8::25"


def test_dsn_smtp_40_dsn_12_null_sender_gets_no_dsn() -> None:
    for null in ("", "<>", " <> "):
        assert should_bounce(null) is False
        with pytest.raises(ValueError):
            build(original_sender=null)
    assert should_bounce("alice@sender.example") is True
    assert should_bounce("<alice@sender.example>") is True


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("<@a.example,@b.example:user@d.example>", "user@d.example"),
        ("@a.example:user@d.example", "user@d.example"),
        ("<@[192.0.2.1],@b.example:user@d.example>", "user@d.example"),
        ("<user@d.example>", "user@d.example"),
        (" user@d.example ", "user@d.example"),
        ('<"odd:local"@d.example>', '"odd:local"@d.example'),
    ],
)
def test_dsn_smtp_42_source_route_dropped(path: str, expected: str) -> None:
    assert bounce_recipient(path) == expected


def test_dsn_smtp_42_bounce_goes_to_the_route_free_address() -> None:
    msg = parse(build(original_sender="<@hop1.example,@hop2.example:alice@sender.example>"))
    assert msg["To"].addresses[0].addr_spec == "alice@sender.example"


def test_dsn_smtp_42_null_path_has_no_bounce_recipient() -> None:
    with pytest.raises(ValueError):
        bounce_recipient("<>")


@pytest.mark.parametrize(
    "sender",
    ["no-domain", "a@b\r\nBcc: evil@x.example", "a b@c.example", "@only.example", "a@", "a@b@c d", "x" * 600 + "@a.b",
     "a\x85b@c.example", "a\u2028b@c.example", "a\ud800@c.example"],
)
def test_dsn_3_unusable_sender_rejected(sender: str) -> None:
    with pytest.raises(ValueError):
        build(original_sender=sender)


def test_dsn_3_quoted_local_part_sender_round_trips() -> None:
    msg = parse(build(original_sender='"john doe"@sender.example'))
    assert msg["To"].addresses[0].addr_spec == '"john doe"@sender.example'


def test_dsn_6_quoted_local_part_recipient_stays_rfc822() -> None:
    rcpt = FailedRecipient('"john doe"@dest.example', "5.1.1")
    assert blocks(parse(build(recipients=[rcpt])))[1]["Final-Recipient"] == 'rfc822; "john doe"@dest.example'


def test_dsn_3_non_ascii_sender_gets_utf8_header_and_ascii_part2() -> None:
    raw = build(original_sender="jörg@bücher.example")
    assert "To: jörg@bücher.example\r\n".encode() in raw
    assert part2_bytes(raw).isascii()
    # BytesParser keeps 8-bit header octets as surrogate escapes; read the header as UTF-8 text.
    headers = email.message_from_string(raw.decode("utf-8"), policy=email.policy.default)
    assert headers["To"].addresses[0].addr_spec == "jörg@bücher.example"
    assert raw.split(b"\r\n\r\n", 1)[1].isascii()  # bodies stay 7-bit


def test_dsn_ascii_message_is_all_7bit() -> None:
    rcpt = FailedRecipient("bob@dest.example", "5.1.1", reason="Zustellung fehlgeschlagen: Empfänger")
    raw = build(recipients=[rcpt])
    assert raw.isascii()
    assert "Empfänger" in parts(parse(raw))[0].get_content()


def test_dsn_wire_form_crlf_and_998() -> None:
    assert_wire_form(build())


def test_dsn_deterministic_and_boundary_depends_on_content() -> None:
    assert build() == build()
    assert parse(build()).get_boundary() != parse(build(message_id="<other@mx.relay.example>")).get_boundary()


def test_dsn_naive_datetimes_are_utc() -> None:
    naive = build(now=NOW.replace(tzinfo=None), arrival=ARRIVAL.replace(tzinfo=None))
    assert parse(naive)["Date"] == parse(build())["Date"]
    other_zone = NOW.astimezone(timezone(timedelta(hours=2)))
    assert parsedate_to_datetime(parse(build(now=other_zone))["Date"]) == NOW


def test_dsn_no_recipients_rejected() -> None:
    with pytest.raises(ValueError):
        build(recipients=[])


# --- the original's header section (DSN-2) ------------------------------------------------------


def third_part(raw: bytes) -> tuple[Message, bytes]:
    third = parts(parse(raw))[2]
    data = third.get_payload(decode=True)
    assert isinstance(data, bytes)
    return third, data


def test_dsn_2_header_only_original() -> None:
    original = b"From: a@sender.example\r\nSubject: no body\r\n"
    third, data = third_part(build(original=original))
    assert data.splitlines() == [b"From: a@sender.example", b"Subject: no body"]
    assert third["Content-Transfer-Encoding"] == "7bit"


def test_dsn_2_original_without_separator_is_all_header() -> None:
    original = b"From: a@sender.example\r\nSubject: cut off"
    _, data = third_part(build(original=original))
    assert data.splitlines() == [b"From: a@sender.example", b"Subject: cut off"]


def test_dsn_2_lf_only_original() -> None:
    original = b"From: a@sender.example\nSubject: unix\n\nbody\n"
    raw = build(original=original)
    assert_wire_form(raw)
    _, data = third_part(raw)
    assert data.splitlines() == [b"From: a@sender.example", b"Subject: unix"]


def test_dsn_2_empty_header_section() -> None:
    _, data = third_part(build(original=b"\r\nonly a body\r\n"))
    assert data == b""
    _, data = third_part(build(original=b""))
    assert data == b""


def test_dsn_2_long_header_line_is_quoted_printable_and_exact() -> None:
    long_value = b"x" * 3000
    original = b"Subject: hi\r\nX-Long: " + long_value + b"\r\n\r\nbody"
    raw = build(original=original)
    assert_wire_form(raw)
    third, data = third_part(raw)
    assert third["Content-Transfer-Encoding"] == "quoted-printable"
    assert data.splitlines() == [b"Subject: hi", b"X-Long: " + long_value]


def test_dsn_2_utf8_header_kept_with_charset() -> None:
    original = "Subject: Grüße aus Köln\r\nFrom: jörg@bücher.example\r\n\r\n".encode()
    raw = build(original=original)
    assert raw.isascii()
    third, data = third_part(raw)
    assert third.get_content_charset() == "utf-8"
    assert data.decode("utf-8").splitlines() == ["Subject: Grüße aus Köln", "From: jörg@bücher.example"]


def test_dsn_2_invalid_utf8_header_octets_kept_exactly() -> None:
    original = b"Subject: caf\xe9 \xff\x00\x1b\r\nX: y\r\n\r\n"
    raw = build(original=original)
    assert raw.isascii()
    third, data = third_part(raw)
    assert third.get_content_charset() == "iso-8859-1"
    assert data.splitlines() == [b"Subject: caf\xe9 \xff\x00\x1b", b"X: y"]


def test_dsn_2_header_section_capped_at_line_boundary() -> None:
    original = b"".join(b"X-Line-%03d: %s\r\n" % (i, b"v" * 50) for i in range(100)) + b"\r\nbody"
    raw = build(original=original, max_headers=1000)
    _, data = third_part(raw)
    lines = data.splitlines()
    assert 0 < len(lines) < 100
    assert sum(len(line) + 2 for line in lines) <= 1000
    assert all(re.fullmatch(rb"X-Line-\d{3}: v{50}", line) for line in lines)  # no partial line
    assert "cut" in parts(parse(raw))[0].get_content()


def test_dsn_2_boundary_text_in_original_cannot_break_structure() -> None:
    # Even a header line that looks like a MIME delimiter stays inside part 3.
    original = b"X-Trap: 1\r\n--dsn.0000\r\n--dsn.0000--\r\n\r\n"
    msg = parse(build(original=original))
    assert len(parts(msg)) == 3


def test_dsn_human_part_lists_each_recipient_with_reason_and_remote_reply() -> None:
    text = parts(parse(build()))[0].get_content()
    assert "mx.relay.example" in text
    assert "<bob@dest.example>: failed, status 5.1.1" in text
    assert "mailbox does not exist" in text
    assert "mx1.dest.example said: 550 5.1.1" in text
    assert max(len(line) for line in text.splitlines()) <= 76
