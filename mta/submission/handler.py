"""aiosmtpd handler hooks: relay control at RCPT, durable spooling at DATA.

Rules:
- Never an open relay: a client may relay only from `relay_networks` or after AUTH; everyone
  else gets 554 5.7.1 at RCPT, whatever tricks the address holds (we have no local domains, so
  the decision never depends on the address).
- 250 after DATA only once the spool has fsync'ed the message (store.put returns then). A spool
  that cannot take it answers 452 4.3.1 when the disk is full (or would keep less than
  SUBMISSION_RESERVE free), 451 4.3.0 for any other write failure: temporary, the client retries.
- As a submission server (RFC 6409 §8) we add Message-ID and Date when missing and always
  prepend a Received: field (SMTP-43); bare CR / LF line ends become CRLF (SMTP-26 decision),
  so no `\\n.\\n` can ever be read as an end of data further down the line.
- Nothing the client says reaches a header or a log line raw: addresses with control characters
  are refused, the HELO name in Received: is reduced to printable ASCII, logged client text is
  escaped, and passwords are never logged (AUTH of an unknown user costs one scrypt as well, so
  timing does not tell which user names exist).
"""

from __future__ import annotations

import email.utils
import ipaddress
import re
import time
from collections.abc import Callable
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from mta import log, metrics
from mta.config import SubmissionConfig
from mta.errors import SpoolError
from mta.spool.state import MessageMeta
from mta.spool.store import SUBMISSION_RESERVE, SpoolStore, make_meta

_LINE_ENDS = re.compile(rb"\r\n|\r|\n")
_HEADER_NAME = re.compile(rb"^([!-9;-~]+):", re.M)
_LABEL_CHAR = r"[A-Za-z0-9\u0080-\U0010ffff]"
_DOMAIN = re.compile(rf"^(?:\[[^\[\]\s]+\]|{_LABEL_CHAR}(?:[A-Za-z0-9\u0080-\U0010ffff.-]*{_LABEL_CHAR})?)$")
_SOURCE_ROUTE = re.compile(r"^@[^:]+:")
# C0/C1 controls, DEL and lone surrogates (invalid UTF-8 kept by surrogateescape) in an address would
# reach MAIL/RCPT lines downstream, the Received: field and the logs.
_BAD_ADDRESS_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_LOG_LIMIT = 256


def log_safe(text: str, limit: int = _LOG_LIMIT) -> str:
    """Client-supplied text for a log field: control characters escaped, length capped."""
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:limit])
    return out + "..." if len(text) > limit else out


def helo_for_header(name: str) -> str:
    """The EHLO/HELO argument as it may appear in our Received: field: printable ASCII, no spaces."""
    cleaned = "".join(c if "!" <= c <= "~" else "?" for c in name[:255])
    return cleaned or "unknown"


def strip_source_route(address: str) -> str:
    """`@a,@b:user@d` -> `user@d` (RFC 5321 §4.1.2: relays ignore source routes)."""
    return _SOURCE_ROUTE.sub("", address)


def valid_address(address: str) -> bool:
    """Local@domain with a plausible domain; length limits of RFC 5321 §4.5.3.1 (SMTP-28)."""
    local, sep, domain = address.rpartition("@")
    if not sep or not local or not domain or len(local) > 64 or len(domain) > 255 or len(address) > 254:
        return False
    if _BAD_ADDRESS_CHARS.search(address):
        return False
    if " " in local and not (len(local) > 1 and local.startswith('"') and local.endswith('"')):
        return False  # a space only inside a quoted local part (RFC 5321 §4.1.2 Quoted-string)
    return bool(_DOMAIN.match(domain)) and ".." not in domain


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


def add_submission_headers(data: bytes, *, received: str, hostname: str, now: float) -> bytes:
    """Prepend Received:, add Message-ID and Date when the client left them out (RFC 6409 §8)."""
    names = {m.group(1).lower() for m in _HEADER_NAME.finditer(header_block(data))}
    extra = [f"Received: {_folded(received)}"]
    if b"message-id" not in names:
        extra.append(f"Message-ID: {email.utils.make_msgid(domain=hostname)}")
    if b"date" not in names:
        extra.append(f"Date: {email.utils.formatdate(now)}")
    if not data.startswith(b"\r\n") and not _HEADER_NAME.match(data):
        # No header section at all: keep the body a body.
        data = b"\r\n" + data
    return _field_bytes("\r\n".join(extra)) + b"\r\n" + data


_DUMMY: list[str] = []


def _dummy_hash() -> str:
    """A stored hash nobody knows the password of, made once (an scrypt at import would slow startup)."""
    if not _DUMMY:
        from mta.submission.auth import hash_password

        _DUMMY.append(hash_password(__name__))
    return _DUMMY[0]


class SubmissionHandler:
    """The hook object passed to aiosmtpd's SMTP protocol."""

    def __init__(
        self,
        cfg: SubmissionConfig,
        hostname: str,
        store: SpoolStore,
        on_accept: Callable[[MessageMeta], None],
        users: dict[str, str] | None = None,
    ) -> None:
        self.cfg = cfg
        self.hostname = hostname
        self.store = store
        self.on_accept = on_accept
        self.users = users or {}
        self.networks = cfg.networks

    def may_relay(self, session: Session) -> bool:
        if session.authenticated:
            return True
        peer = session.peer[0] if isinstance(session.peer, tuple) else None
        if not peer:
            return False
        try:
            ip = ipaddress.ip_address(peer.split("%")[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.networks)

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname
        out = [r for r in responses if not (r.startswith("250-AUTH") and not self.users)]
        out[-1:-1] = ["250-PIPELINING", "250-ENHANCEDSTATUSCODES"]
        return out

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          mail_options: list[str]) -> str:
        # aiosmtpd hands the null reverse-path over as "<>"; keep that (a falsy value would make
        # aiosmtpd answer RCPT with 503) and store it as "" in the spool.
        if address != "<>":
            address = strip_source_route(address)
            if not valid_address(address):
                return "553 5.1.7 Bad sender address syntax"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        peer = session.peer[0] if isinstance(session.peer, tuple) else "?"
        if not self.may_relay(session):
            log.event("refused", recipient=log_safe(address), client=peer, reason="relay access denied",
                      reply="554 5.7.1 Relay access denied")
            return "554 5.7.1 Relay access denied"
        if len(envelope.rcpt_tos) >= self.cfg.max_recipients:
            return "452 4.5.3 Too many recipients"
        address = strip_source_route(address)
        if not valid_address(address):
            return "501 5.1.3 Bad recipient address syntax"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        now = time.time()
        peer = session.peer[0] if isinstance(session.peer, tuple) else "unknown"
        helo = helo_for_header(session.host_name or "")
        tls = session.ssl and session.ssl.get("ssl_object")
        proto = "ESMTPSA" if session.authenticated else "ESMTPS" if tls else "ESMTP"
        # One recipient: name it (as Postfix does); several: naming them would leak Bcc.
        for_part = f"\r\n\tfor <{envelope.rcpt_tos[0]}>" if len(envelope.rcpt_tos) == 1 else ""
        received = (f"from {helo} ([{peer}])\r\n\tby {self.hostname} (mta) with {proto}{for_part};"
                    f"\r\n\t{email.utils.formatdate(now)}")
        data = add_submission_headers(normalise_line_ends(raw), received=received, hostname=self.hostname, now=now)
        if len(data) > self.cfg.max_message_size:
            return "552 5.3.4 Message too big"
        options = {o.upper() for o in envelope.mail_options}
        meta = make_meta(
            sender="" if envelope.mail_from in (None, "<>") else envelope.mail_from,
            recipients=list(envelope.rcpt_tos),
            data=data,
            now=now,
            client=f"{helo} [{peer}]",
            eight_bit=not data.isascii(),
            smtputf8="SMTPUTF8" in options,
        )
        try:
            # The reserve keeps room for the state and DSNs of mail already accepted (README "Spool").
            await self.store.put(meta, data, reserve=SUBMISSION_RESERVE)
        except SpoolError as exc:
            log.event("refused", sender=meta.sender, client=peer, reason=str(exc))
            if "full" in str(exc):
                return "452 4.3.1 Insufficient system storage, try again later"
            return "451 4.3.0 Temporary local problem, try again later"
        log.event("accepted", queue_id=meta.id, **{"from": meta.sender}, nrcpt=len(meta.recipients),
                  size=meta.size, client=meta.client)
        metrics.message_received(getattr(server, "listener", "smtp"))
        self.on_accept(meta)
        return f"250 2.0.0 Ok: queued as {meta.id}"

    def authenticator(self, server: SMTP, session: Session, envelope: Envelope, mechanism: str,
                      auth_data: Any) -> Any:
        from aiosmtpd.smtp import AuthResult, LoginPassword

        from mta.submission.auth import verify_password

        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        user = auth_data.login.decode("utf-8", "replace")
        stored = self.users.get(user)
        # An unknown user costs the same scrypt as a wrong password: no user enumeration by timing.
        checked = verify_password(auth_data.password.decode("utf-8", "replace"), stored or _dummy_hash())
        ok = stored is not None and checked
        peer = session.peer[0] if isinstance(session.peer, tuple) else "?"
        if not ok:
            # The password is never logged; the user name is (escaped), to make brute force visible.
            log.event("refused", client=peer, user=log_safe(user, 64), reason="authentication failed")
            return AuthResult(success=False, handled=False)
        log.event("authenticated", client=peer, user=log_safe(user, 64))
        return AuthResult(success=True, auth_data=user)
