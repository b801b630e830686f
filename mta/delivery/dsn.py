"""Build RFC 3464 delivery status notifications: bounces and delay warnings.

Rule: a notification goes only to a non-null reverse-path (SMTP-40, DSN-12), with any source route
stripped (SMTP-42), and is a ``multipart/report; report-type=delivery-status`` of three parts (DSN-1,
DSN-2): a human explanation (text/plain), a ``message/delivery-status`` part with one per-message
block and one block per recipient (DSN-4, DSN-5), and the original's header section as
``text/rfc822-headers``. Every line ends in CRLF and is at most 998 octets; part 2 is US-ASCII
(DSN-6). Bad input raises ValueError and nothing else, whatever bytes ``original`` holds.

Non-ASCII addresses in part 2 use the RFC 6533 ``utf-8`` address type in its 7-bit form
(utf-8-addr-xtext): every character outside printable ASCII, and ``+``, ``=`` and ``\\``, becomes
``\\x{HEX}``. ASCII addresses keep the classic ``rfc822`` type. Non-ASCII diagnostic text is escaped
the same way. When the bounce recipient itself is non-ASCII, the top-level header section is
written in UTF-8 (RFC 6532): such a bounce can only travel with SMTPUTF8 anyway. Bodies stay 7-bit.

The MIME is assembled by the email package. Pure: no I/O, no clock (``now`` and ``arrival`` are
arguments), no randomness: the MIME boundary is a digest of the content, so the same input gives
the same bytes and the boundary cannot occur inside the parts.
"""

from __future__ import annotations

import email.policy
import hashlib
import ipaddress
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.header import Header
from email.headerregistry import Address
from email.message import EmailMessage, Message, MIMEPart
from email.policy import EmailPolicy
from email.utils import format_datetime

from mta import idn

SUBJECT_FAILED = "Undelivered Mail Returned to Sender"
SUBJECT_DELAYED = "Delayed Mail (still being retried)"

#: Action value -> the status class it must carry (RFC 3464 §2.3.3, DSN-5).
ACTION_CLASS = {"failed": "5", "delayed": "4", "delivered": "2", "relayed": "2", "expanded": "2"}

_STATUS = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")  # RFC 3463 §2 (ASCII digits: \d takes any script)
# A field value of part 2 may not be longer than this, so "Name: type; value" fits one 998-octet
# line even when the value is a single unbreakable word (RFC 5322 §2.1.1).
_MAX_FIELD = 900
_MAX_ADDRESS = 512  # octets; longer paths cannot arrive over SMTP (RFC 5321 §4.5.3.1.3 says 256)
_LABEL = r"(?:[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*")
_MSG_ID_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
_MSG_ID = re.compile(rf"{_MSG_ID_ATOM}@(?:{_MSG_ID_ATOM}|\[[\x21-\x5a\x5e-\x7e]*\])")
# Source route of RFC 5321 §4.1.2 (A-d-l ":"), which SMTP-42 says to drop.
_AT_DOMAIN = r"@\s*(?:\[[^\]]*\]|[^,:\[\]@]*)"
_ROUTE = re.compile(rf"{_AT_DOMAIN}(?:\s*,\s*{_AT_DOMAIN})*\s*:")
_QUOTED_LOCAL = re.compile(r'"(?:[^"\\]|\\.)*"')
_DOT_LOCAL = re.compile(r'[^\s"(),:;<>@\[\\\]]+')
_DOMAIN_LITERAL = re.compile(r"\[[^\s\[\]\\]+\]")
_DOMAIN = re.compile(r'[^\s.@\[\]\\()<>,;:"]+(?:\.[^\s.@\[\]\\()<>,;:"]+)*\.?')

# CRLF line ends, 7-bit bodies. refold_source="none" keeps the fields of part 2 exactly as folded
# here (with email.header.Header): the default refolding would turn a long word into RFC 2047
# encoded words, which have no meaning in a delivery-status field.
_POLICY = email.policy.SMTP.clone(cte_type="7bit", refold_source="none")
_POLICY_UTF8 = _POLICY.clone(utf8=True)


@dataclass(frozen=True)
class FailedRecipient:
    """One recipient reported in a DSN (one per-recipient block, DSN-5)."""

    address: str
    status: str  # RFC 3463, e.g. "5.1.1"
    action: str = "failed"  # or "delayed" (delay warnings, DSN-13)
    remote_mta: str | None = None  # MX host name that answered
    diagnostic: str | None = None  # the remote reply, e.g. "550 5.1.1 no such user"
    last_attempt: datetime | None = None
    reason: str = ""  # human text for part 1
    will_retry_until: datetime | None = None  # for delayed


def _unwrap(path: str) -> str:
    """The reverse-path without surrounding spaces and angle brackets."""
    path = path.strip()
    if path.startswith("<"):
        path = path[1:]
    if path.endswith(">"):
        path = path[:-1]
    return path.strip()


def should_bounce(original_sender: str) -> bool:
    """False for the null reverse-path: its failures are only logged (SMTP-40, DSN-12, SMTP-38)."""
    return _unwrap(original_sender) != ""


def bounce_recipient(original_sender: str) -> str:
    """The address a notification goes to: brackets and any source route dropped (SMTP-42)."""
    path = _unwrap(original_sender)
    route = _ROUTE.match(path)
    if route:
        path = path[route.end() :].strip()
    if not path:
        raise ValueError("the null reverse-path gets no notification (SMTP-40)")
    return path


def _aware(value: datetime, what: str) -> datetime:
    """Naive datetimes are taken as UTC; anything else is rejected."""
    if not isinstance(value, datetime):
        raise ValueError(f"{what} must be a datetime")
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _date(value: datetime, what: str) -> str:
    return format_datetime(_aware(value, what))


def _hostname(value: str, what: str) -> str:
    """An ASCII host name (IDNA A-labels for non-ASCII input), without a trailing dot."""
    name = value.strip().rstrip(".")
    if not name.isascii():
        try:
            name = idn.to_ascii(name)  # IDNA 2008, one rule with DNS, policies and reports
        except ValueError as exc:  # say which field was bad
            raise ValueError(f"{what} is not a valid host name: {value!r}") from exc
    if not _HOSTNAME.fullmatch(name):
        raise ValueError(f"{what} is not a valid host name: {value!r}")
    return name


def _mta_name(value: str) -> str:
    """Remote-MTA value: a host name, or an IP address (bare or as an RFC 5321 address literal)."""
    text = value.strip()
    literal = re.sub(r"(?i)^ipv6:", "", text.strip("[]"))
    try:
        return str(ipaddress.ip_address(literal))
    except ValueError:
        return _hostname(text, "remote_mta")


def _has_bad_chars(text: str) -> bool:
    """C0 and C1 controls (a CR or LF would start a header field of its own), Unicode line and
    paragraph separators (line breaks to some parsers) and lone surrogates."""
    return any(
        ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F or c in "\u2028\u2029" or 0xD800 <= ord(c) <= 0xDFFF for c in text
    )


def _xtext_char(c: str) -> str:
    """RFC 6533 EmbeddedUnicodeChar: \\x{HEX}, upper case, at least two digits."""
    return f"\\x{{{ord(c):02X}}}"


def _typed_address(address: str) -> str:
    """Final-Recipient value: `rfc822; addr` for ASCII, else `utf-8; <utf-8-addr-xtext>` (DSN-6)."""
    addr = _unwrap(address)
    if not addr:
        raise ValueError("a recipient address is empty")
    if all(0x20 <= ord(c) < 0x7F for c in addr):  # spaces occur in quoted local parts
        typed = f"rfc822; {addr}"
    else:
        # QCHAR of RFC 6533 §3: printable ASCII except space, "+", "=" and "\".
        typed = "utf-8; " + "".join(
            c if 0x20 < ord(c) < 0x7F and c not in "+=\\" else _xtext_char(c) for c in addr
        )
    if len(typed) > _MAX_FIELD:
        raise ValueError(f"recipient address too long for a delivery-status field: {addr[:40]!r}...")
    return typed


def _ascii_text(text: str, limit: int = _MAX_FIELD, total: int = 4 * _MAX_FIELD) -> str:
    """Free text as one US-ASCII field value: controls become spaces, non-ASCII and "\\" become \\x{HEX}.

    Words are cut to `limit` characters (a word cannot be folded, so it must fit one line) and the
    whole value to about `total`; a cut is marked with "...".
    """
    words = "".join(" " if ord(c) < 0x20 or ord(c) == 0x7F else c for c in text).split()
    out: list[str] = []
    size = 0
    for word in words:
        # "\\" is escaped too, so every backslash in the result starts an escape.
        piece = "".join(c if c.isascii() and c != "\\" else _xtext_char(c) for c in word)
        if len(piece) > limit:
            piece = piece[: limit - 3]
            if "\\" in piece and "}" not in piece[piece.rindex("\\") :]:
                piece = piece[: piece.rindex("\\")]  # never split a \\x{...} escape
            piece += "..."
        if size + len(piece) > total:
            out.append("...")
            break
        out.append(piece)
        size += len(piece) + 1
    return " ".join(out)


def _field(block: Message, name: str, value: str) -> None:
    """Add a delivery-status field, folded at spaces; long words stay whole (all fit 998 octets)."""
    folded = Header(value, charset="us-ascii", header_name=name, maxlinelen=78).encode(
        splitchars=" ", linesep="\r\n"
    )
    block[name] = folded


def _recipient_block(rcpt: FailedRecipient) -> Message:
    """One per-recipient block of part 2 (RFC 3464 §2.3, DSN-5, DSN-7)."""
    action = rcpt.action
    if action not in ACTION_CLASS:
        raise ValueError(f"unknown DSN action {action!r}")
    if not isinstance(rcpt.status, str) or not _STATUS.fullmatch(rcpt.status):
        raise ValueError(f"status {rcpt.status!r} is not an RFC 3463 code")
    if rcpt.status[0] != ACTION_CLASS[action]:
        # DSN-5: failed needs 5.x.x, delayed 4.x.x, the others 2.x.x.
        raise ValueError(f"status {rcpt.status} does not fit action {action!r}")
    block = Message(policy=email.policy.compat32)  # plain field store; folding is done in _field
    _field(block, "Final-Recipient", _typed_address(rcpt.address))
    _field(block, "Action", action)
    _field(block, "Status", rcpt.status)
    if rcpt.remote_mta:
        _field(block, "Remote-MTA", f"dns; {_mta_name(rcpt.remote_mta)}")
    if rcpt.diagnostic:
        text = re.sub(r"(?i)^\s*smtp\s*;", "", rcpt.diagnostic)  # accept an already typed value
        text = _ascii_text(text)
        if text:
            _field(block, "Diagnostic-Code", f"smtp; {text}")
    if rcpt.last_attempt is not None:
        _field(block, "Last-Attempt-Date", _date(rcpt.last_attempt, "last_attempt"))
    if action == "delayed" and rcpt.will_retry_until is not None:
        _field(block, "Will-Retry-Until", _date(rcpt.will_retry_until, "will_retry_until"))
    return block


def _header_section(original: bytes, cap: int) -> tuple[list[bytes], bool]:
    """The original's header lines (line ends removed), up to the first empty line, at most `cap` octets.

    A message without an empty line is all header. Returns the lines and whether it was cut.
    """
    head = original[:cap]  # never copy more of a large message than the cap
    lines: list[bytes] = []
    for line in head.splitlines(keepends=True):
        if line in (b"\r\n", b"\n", b"\r"):
            return [ln.rstrip(b"\r\n") for ln in lines], False
        lines.append(line)
    cut = len(original) > cap
    if cut and len(lines) > 1 and not lines[-1].endswith((b"\n", b"\r")):
        lines.pop()  # drop the partial line the cap ran into
    return [ln.rstrip(b"\r\n") for ln in lines], cut


def _headers_part(lines: list[bytes], policy: EmailPolicy[EmailMessage]) -> MIMEPart:
    """Part 3 (DSN-2): text/rfc822-headers; 7bit when it is clean ASCII, else quoted-printable."""
    part = MIMEPart(policy=policy)
    raw = b"\n".join(lines)
    clean = all(len(ln) <= 998 and all(b == 9 or 0x20 <= b < 0x7F for b in ln) for ln in lines)
    if clean:
        part.set_content(raw.decode("ascii") + "\n", subtype="rfc822-headers", charset="us-ascii", cte="7bit")
        if not lines:
            part.set_payload("")  # an empty header section, not one empty line
        return part
    try:
        text, charset = raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        # Not UTF-8: keep the octets exactly (latin-1 maps each octet to one character) and
        # label them with the most common legacy charset.
        text, charset = raw.decode("latin-1"), "iso-8859-1"
    part.set_content(text + "\n", subtype="rfc822-headers", charset=charset, cte="quoted-printable")
    return part


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else " " for c in text)


def _wrap(text: str, indent: str = "") -> list[str]:
    return textwrap.wrap(_printable(text), width=76, initial_indent=indent, subsequent_indent=indent,
                         break_on_hyphens=False) or [indent.rstrip()]


def _human_part(reporting_mta: str, recipients: Sequence[FailedRecipient], cut: bool,
                policy: EmailPolicy[EmailMessage]) -> MIMEPart:
    """Part 1 (DSN-2): what happened, per recipient, in plain words."""
    failed = [r for r in recipients if r.action == "failed"]
    delayed = [r for r in recipients if r.action == "delayed"]
    other = [r for r in recipients if r.action not in ("failed", "delayed")]
    lines = [f"This is the mail delivery system at {reporting_mta}.", ""]
    groups = (
        (failed, "Your message could not be delivered to the recipients below. The mail system "
                 "has given up on them; the reason is given for each."),
        (delayed, "Your message has not yet been delivered to the recipients below. The mail "
                  "system is still trying; you do not need to send it again."),
        (other, "Delivery report for the recipients below."),
    )
    for group, intro in groups:
        if not group:
            continue
        lines += [*_wrap(intro), ""]
        for rcpt in group:
            lines += _wrap(f"<{_unwrap(rcpt.address)}>: {rcpt.action}, status {rcpt.status}")
            if rcpt.reason:
                lines += _wrap(rcpt.reason, "    ")
            if rcpt.remote_mta and rcpt.diagnostic:
                lines += _wrap(f"{rcpt.remote_mta} said: {rcpt.diagnostic}", "    ")
            elif rcpt.diagnostic:
                lines += _wrap(f"The remote server said: {rcpt.diagnostic}", "    ")
            if rcpt.action == "delayed" and rcpt.will_retry_until is not None:
                lines += _wrap(f"Will keep trying until {_date(rcpt.will_retry_until, 'will_retry_until')}.",
                               "    ")
            lines.append("")
    lines.append("The header of your message is attached." + (" It was too long and has been cut." if cut else ""))
    text = "\n".join(lines) + "\n"
    part = MIMEPart(policy=policy)
    part.set_content(text, charset="utf-8", cte="7bit" if text.isascii() else "quoted-printable")
    return part


def _bounce_to(original_sender: str) -> Address:
    """The To: mailbox, checked to be an RFC 5321/6531 Mailbox (DSN-3)."""
    addr = bounce_recipient(original_sender)
    if len(addr.encode("utf-8", "surrogatepass")) > _MAX_ADDRESS or _has_bad_chars(addr):
        raise ValueError(f"reverse-path is not a usable address: {addr[:60]!r}")
    local, at, domain = addr.rpartition("@")
    if not at or not local or not domain:
        raise ValueError(f"reverse-path has no domain: {addr[:60]!r}")
    if _QUOTED_LOCAL.fullmatch(local):
        local = re.sub(r"\\(.)", r"\1", local[1:-1])  # Address re-quotes it as needed
        if not local:
            raise ValueError("reverse-path has an empty local part")
    elif not _DOT_LOCAL.fullmatch(local):
        raise ValueError(f"reverse-path has an invalid local part: {addr[:60]!r}")
    if not (_DOMAIN_LITERAL.fullmatch(domain) or _DOMAIN.fullmatch(domain)):
        raise ValueError(f"reverse-path has an invalid domain: {addr[:60]!r}")
    return Address(username=local, domain=domain.rstrip("."))


def _message_id(value: str) -> str:
    mid = value.strip()
    if mid.startswith("<") and mid.endswith(">"):
        mid = mid[1:-1]
    if len(mid) > _MAX_FIELD or not _MSG_ID.fullmatch(mid):
        raise ValueError(f"not a message id: {value[:60]!r}")
    return f"<{mid}>"


def build_dsn(
    *,
    reporting_mta: str,
    original_sender: str,
    original: bytes,
    recipients: Sequence[FailedRecipient],
    arrival: datetime,
    now: datetime,
    message_id: str,
    max_headers: int = 64 * 1024,
) -> bytes:
    """The complete DSN message (header and body, CRLF lines) for the recipients given (DSN-1..7, DSN-11).

    Send it with MAIL FROM:<> to ``bounce_recipient(original_sender)`` (DSN-3). Raises ValueError for
    a null sender (SMTP-40) and for any input it cannot represent.
    """
    if not should_bounce(original_sender):
        raise ValueError("the null reverse-path gets no notification (SMTP-40, DSN-12)")
    if not recipients:
        raise ValueError("a DSN needs at least one recipient")
    if not isinstance(max_headers, int) or max_headers < 1:
        raise ValueError("max_headers must be a positive integer")
    original = bytes(original)
    host = _hostname(reporting_mta, "reporting_mta")
    to = _bounce_to(original_sender)
    policy = _POLICY if str(to).isascii() else _POLICY_UTF8
    mid = _message_id(message_id)

    header_lines, cut = _header_section(original, max_headers)
    per_message = Message(policy=email.policy.compat32)
    _field(per_message, "Reporting-MTA", f"dns; {host}")  # DSN-4
    _field(per_message, "Arrival-Date", _date(arrival, "arrival"))
    status = MIMEPart(policy=policy)
    status["Content-Type"] = "message/delivery-status"
    status.set_payload([per_message, *(_recipient_block(r) for r in recipients)])

    human = _human_part(host, recipients, cut, policy)
    parts: list[Message | str] = [human, status, _headers_part(header_lines, policy)]
    # The boundary is a digest of everything the parts are made of, so no part can contain it
    # (that would need a preimage) and the output is deterministic.
    digest = hashlib.sha256(repr((mid, host, str(to), recipients, arrival, now)).encode("utf-8", "replace"))
    digest.update(b"\n".join(header_lines))
    boundary = "dsn." + digest.hexdigest()[:40]

    msg = EmailMessage(policy=policy)
    msg["From"] = Address(display_name="Mail Delivery System", username="MAILER-DAEMON", domain=host)
    msg["To"] = to
    msg["Subject"] = SUBJECT_FAILED if any(r.action == "failed" for r in recipients) else SUBJECT_DELAYED
    msg["Date"] = _date(now, "now")
    msg["Message-ID"] = mid
    msg["Auto-Submitted"] = "auto-replied"  # RFC 3834 §5: a DSN is an automatic reply
    msg["MIME-Version"] = "1.0"
    msg["Content-Type"] = f'multipart/report; report-type=delivery-status; boundary="{boundary}"'
    msg.set_payload(parts)
    return msg.as_bytes(policy=policy)
