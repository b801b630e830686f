"""Header work done at submission, shared by SMTP and sendmail (pure functions on bytes).

- Bare CR / LF line ends become CRLF (SMTP-26 decision), so no `\\n.\\n` can ever be read as an
  end of data further down the line.
- As a submission server (RFC 6409 §8) we add Message-ID and Date when missing and always
  prepend a Received: field (SMTP-43), folded so client text can never start a field of its own.
"""

from __future__ import annotations

import email.utils
import functools
import math
import re

_LINE_ENDS = re.compile(rb"\r\n|\r|\n")
_HEADER_NAME = re.compile(rb"^([!-9;-~]+):", re.M)


def normalise_line_ends(data: bytes) -> bytes:
    """Every CRLF, bare CR and bare LF becomes CRLF (SMTP-26)."""
    return _LINE_ENDS.sub(b"\r\n", data)


def header_block(data: bytes) -> bytes:
    end = data.find(b"\r\n\r\n")
    return data if end < 0 else data[: end + 2]


def _folded(value: str) -> str:
    """A field value on CRLF-folded lines: every line after the first starts with white space, and
    empty lines are dropped, so the value can neither start a header of its own nor end the header
    section (a HELO name like `x\\rBcc: y` stays inside Received:)."""
    lines = re.split(r"\r\n|\r|\n", value)
    out = [lines[0]] + [ln if ln[:1] in (" ", "\t") else "\t" + ln for ln in lines[1:] if ln.strip()]
    return "\r\n".join(out)


def _field_bytes(text: str) -> bytes:
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate surrogateescape cannot map back to a byte
        return text.encode("utf-8", "replace")


def rfc5322_date(now: float) -> str:
    """email.utils.formatdate(now), made once per second (it shows whole seconds only)."""
    second = math.floor(now)
    if now - second < 0.999:
        return _date_of_second(second)
    return email.utils.formatdate(now)  # it rounds to microseconds, which may carry into the next second


@functools.lru_cache(maxsize=4)
def _date_of_second(second: int) -> str:
    return email.utils.formatdate(second)


def add_submission_headers(data: bytes, *, received: str, hostname: str, now: float) -> bytes:
    """Prepend Received:, add Message-ID and Date when the client left them out (RFC 6409 §8)."""
    names = {m.group(1).lower() for m in _HEADER_NAME.finditer(header_block(data))}
    extra = [f"Received: {_folded(received)}"]
    if b"message-id" not in names:
        extra.append(f"Message-ID: {email.utils.make_msgid(domain=hostname)}")
    if b"date" not in names:
        extra.append(f"Date: {rfc5322_date(now)}")
    if not data.startswith(b"\r\n") and not _HEADER_NAME.match(data):
        # No header section at all: keep the body a body.
        data = b"\r\n" + data
    return _field_bytes("\r\n".join(extra)) + b"\r\n" + data
