"""The body as sent after 354 (mta.delivery.wire, PERF-6): the cheap checks that skip aiosmtplib's
regexes never change the result (SMTP-25 dot-stuffing, SMTP-26 CRLF line endings)."""

from __future__ import annotations

from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mta.delivery.wire import crlf_body, dot_stuffed


def _reference(data: bytes) -> bytes:
    """What aiosmtplib sends for `data`: its CRLF normaliser, its dot-stuffing regex, the final dot."""
    return PERIOD_REGEX.sub(b"..", normalize_message_line_endings(data)) + b".\r\n"


# Bodies built from the pieces that matter: line ends of every kind, dots where lines start, text.
_PIECES = st.sampled_from([b"\r\n", b"\n", b"\r", b".", b"..", b"a", b"From x", b" ", b"\r\n.\r\n", b"\xc3\xa9",
                           b"\x00", b"\n.", b"\r."])
_BODIES = st.lists(_PIECES, max_size=40).map(b"".join) | st.binary(max_size=200)


@settings(max_examples=3000, deadline=None)
@given(_BODIES)
@example(b"")
@example(b".")
@example(b".\r\n")
@example(b"a\r\n.")
@example(b"\r")
@example(b"\n")
@example(b"a\r\r\n")
@example(b"a\r\n\n")
@example(b"Subject: x\r\n\r\nno final line end")
@example(b"Subject: x\r\n\r\n.leading\r\n..two\r\n.\r\n")
def test_perf_6_body_fast_path_equals_aiosmtplib(data: bytes) -> None:
    assert dot_stuffed(crlf_body(data)) == _reference(data)
    assert crlf_body(data) == normalize_message_line_endings(data)  # SIZE= counts this form (SMTP-29)


def test_perf_6_stored_body_is_not_copied_when_nothing_changes() -> None:
    stored = b"Subject: x\r\n\r\n" + b"line of text\r\n" * 100
    assert crlf_body(stored) is stored  # the spool's CRLF form goes out as it is
