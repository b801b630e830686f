"""The bytes a delivery puts on the wire for MAIL, RCPT and the message body (pure functions).

Command text (PERF-6): `MAIL FROM:<path>` / `RCPT TO:<path>` carry the address exactly as the spool
stores it (validated at submission); the null reverse-path is `<>`. aiosmtplib's `mail()`/`rcpt()`
re-parse every address with `email.utils.parseaddr` first, which costs more than the rest of the
command and silently rewrites some addresses (`a(b)@x` becomes `<a@x>`, `a,b@x` becomes `<a>`).
What cannot be put on a command line is refused exactly as aiosmtplib refuses it: a C0 control or
DEL anywhere (CR/LF would inject a command), whitespace, `<`, `>` or `"` outside a quoted local
part (they would end the path or add parameters), and non-ASCII unless SMTPUTF8 is used (RFC 6531).
Callers turn the ValueError into a 553 before anything is sent.

Body (SMTP-25/26): the result is always `PERIOD_REGEX.sub(b"..", normalize_message_line_endings(b))
+ b".\\r\\n"`, aiosmtplib's own rules; the regexes only run when a cheap count shows they would
change something. The spool's stored form is already CRLF and rarely has a line starting with a dot.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings

# A quoted-string local part at the start of the address (RFC 5321 §4.1.2), whose content may hold
# what is refused elsewhere; the same rule aiosmtplib applies.
_QUOTED_LOCAL = re.compile(r'"(?:[^"\\\r\n]|\\.)*"')
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_PATH_BREAKER = re.compile(r'[\s<>"\x00-\x1f\x7f]')


def path(address: str) -> str:
    """`<address>` for a MAIL/RCPT line ("" -> `<>`); ValueError if it cannot be sent as it is."""
    rest = address
    if address.startswith('"'):
        quoted = _QUOTED_LOCAL.match(address)
        if quoted is not None:
            if _CONTROL.search(address, 0, quoted.end()):
                raise ValueError(f"address {address!r} contains a control character")
            rest = address[quoted.end():]
    if _PATH_BREAKER.search(rest):
        raise ValueError(f"address {address!r} contains characters not permitted in an SMTP mailbox")
    return f"<{address}>"


def mail_command(sender: str, options: Sequence[str], smtputf8: bool) -> bytes:
    """`MAIL FROM:<sender> [options]` + CRLF; ValueError (UnicodeEncodeError) if it cannot be sent."""
    line = " ".join(["MAIL FROM:" + path(sender), *options])
    return line.encode("utf-8" if smtputf8 else "ascii") + b"\r\n"


def rcpt_command(recipient: str, smtputf8: bool) -> bytes:
    """`RCPT TO:<recipient>` + CRLF; ValueError (UnicodeEncodeError) if it cannot be sent."""
    return ("RCPT TO:" + path(recipient)).encode("utf-8" if smtputf8 else "ascii") + b"\r\n"


def crlf_body(data: bytes) -> bytes:
    """`normalize_message_line_endings(data)`: every line ending CRLF, ending in CRLF (SMTP-26)."""
    crlf = data.count(b"\r\n")
    if data.count(b"\r") != crlf or data.count(b"\n") != crlf:
        return normalize_message_line_endings(data)  # a bare CR or LF somewhere
    return data if data.endswith(b"\r\n") else data + b"\r\n"


def dot_stuffed(body: bytes) -> bytes:
    """A CRLF body (crlf_body's result) as sent after 354: dot-stuffed (SMTP-25), with the final dot."""
    if body.startswith(b".") or b"\n." in body:
        body = PERIOD_REGEX.sub(b"..", body)
    return body + b".\r\n"
