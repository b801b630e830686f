"""What sendmail does to its input before the shared acceptance path (pure functions on bytes).

- Without -i, a line holding only "." ends the input (sendmail's classic rule); with -i it is
  message text.
- With -t the recipients come from To:, Cc: and Bcc: (every instance) in addition to those on the
  command line, and Bcc: fields are removed before anything is stored or signed.
- A message without From: gets `From: Full Name <sender>` (-F names it), as sendmail does.
The input may use LF or CRLF; line ends are made CRLF here (the acceptance path does it too).
"""

from __future__ import annotations

import email.utils
import re

from mta.submission.headers import normalise_line_ends

_LONE_DOT = re.compile(rb"^\.\r?(?:\n|\Z)", re.M)
_FIELD = re.compile(rb"^([!-9;-~]+)[ \t]*:")


def cut_at_dot(data: bytes) -> bytes:
    """The input up to the first line that is a single "." (sendmail without -i)."""
    m = _LONE_DOT.search(data)
    return data if m is None else data[: m.start()]


def split_fields(data: bytes) -> tuple[list[bytes], bytes]:
    """CRLF data -> (raw header fields, each with its continuation lines and final CRLF; the rest).

    The header section ends at the first empty line or at the first line that is neither a
    field nor a continuation (which then belongs to the body, as in add_submission_headers)."""
    fields: list[bytes] = []
    pos = 0
    while pos < len(data):
        end = data.find(b"\r\n", pos)
        end = len(data) if end < 0 else end + 2
        line = data[pos:end]
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        elif _FIELD.match(line):
            fields.append(line)
        else:
            break
        pos = end
    return fields, data[pos:]


def _name(field: bytes) -> str:
    m = _FIELD.match(field)
    return m.group(1).decode("ascii").lower() if m else ""


def _value(field: bytes) -> str:
    return field.split(b":", 1)[1].decode("utf-8", "replace").replace("\r\n", "")


def header_recipients(fields: list[bytes]) -> list[str]:
    """Every address in To:, Cc: and Bcc: (RFC 5322 groups flattened), in order."""
    values = [_value(f) for f in fields if _name(f) in ("to", "cc", "bcc")]
    return [addr for _name_part, addr in email.utils.getaddresses(values) if addr]


def prepare(raw: bytes, *, ignore_dots: bool, extract: bool, sender: str, full_name: str | None,
            recipients: tuple[str, ...]) -> tuple[bytes, list[str]]:
    """(message as it enters the acceptance path, envelope recipients, duplicates removed)."""
    data = normalise_line_ends(raw if ignore_dots else cut_at_dot(raw))
    fields, rest = split_fields(data)
    rcpts = list(recipients)
    if extract:
        rcpts += header_recipients(fields)
        fields = [f for f in fields if _name(f) != "bcc"]
    if not any(_name(f) == "from" for f in fields):
        value = email.utils.formataddr((full_name, sender)) if full_name else sender
        fields.insert(0, f"From: {value}\r\n".encode())
    if rest and not rest.startswith(b"\r\n"):
        rest = b"\r\n" + rest  # the header section ended at a body line: keep the body a body
    elif not rest:
        rest = b"\r\n"
    seen: dict[str, None] = {}
    for r in rcpts:
        seen.setdefault(r, None)
    return b"".join(fields) + rest, list(seen)
