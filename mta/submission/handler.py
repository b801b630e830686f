"""aiosmtpd handler hooks: relay control at RCPT, durable spooling at DATA.

Rules:
- Never an open relay: a client may relay only from `relay_networks` or after AUTH; everyone
  else gets 554 5.7.1 at RCPT, whatever tricks the address holds (we have no local domains, so
  the decision never depends on the address).
- 250 after DATA only once the spool has fsync'ed the message (mta.submission.accept). A spool
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

import asyncio
import concurrent.futures
import functools
import inspect
import ipaddress
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from mta import log, metrics
from mta.config import SubmissionConfig
from mta.dkim.signer import Signer
from mta.errors import SpoolError
from mta.spool.state import MessageMeta
from mta.spool.store import SpoolStore
from mta.submission.accept import Acceptor, MessageTooBig, Submission
from mta.submission.headers import (  # noqa: F401  (re-exported: tests and callers import them from here)
    add_submission_headers,
    header_block,
    normalise_line_ends,
    rfc5322_date,
)

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


def hook_names(obj: object, prefixes: tuple[str, ...]) -> list[str]:
    """The attribute names of `obj` that start with one of `prefixes` (see RelaySMTP.__dir__):
    its class's (listed once per class) and its own."""
    own = [name for name in vars(obj) if name.startswith(prefixes)]
    return _class_hook_names(type(obj), prefixes) + own if own else _class_hook_names(type(obj), prefixes)


@functools.cache
def _class_hook_names(cls: type, prefixes: tuple[str, ...]) -> list[str]:
    return [name for name in dir(cls) if name.startswith(prefixes)]


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
        signer: Signer | None = None,
    ) -> None:
        self.cfg = cfg
        self.hostname = hostname
        self.store = store
        self.on_accept = on_accept
        # The one acceptance path, shared with sendmail (headers, DKIM, durable write).
        self.acceptor = Acceptor(store, hostname, cfg.max_message_size, signer)
        self.users = users or {}
        self.networks = cfg.networks

    def __dir__(self) -> list[str]:
        # aiosmtpd looks for handle_*/auth_* with dir() on every connection: list only those,
        # and nothing while RelaySMTP binds what it found before (RelaySMTP.__init__ says why).
        return [] if self._bare else hook_names(self, ("handle_", "auth_"))

    _bare = False

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
                    f"\r\n\t{rfc5322_date(now)}")
        options = {o.upper() for o in envelope.mail_options}
        sub = Submission(sender="" if envelope.mail_from in (None, "<>") else envelope.mail_from,
                         recipients=tuple(envelope.rcpt_tos), raw=raw, received=received,
                         client=f"{helo} [{peer}]", smtputf8="SMTPUTF8" in options)
        try:
            meta = await self.acceptor.accept(sub, now)
        except MessageTooBig:
            return "552 5.3.4 Message too big"
        except SpoolError as exc:
            log.event("refused", sender=sub.sender, client=peer, reason=str(exc))
            if "full" in str(exc):
                return "452 4.3.1 Insufficient system storage, try again later"
            return "451 4.3.0 Temporary local problem, try again later"
        # `accepted` is logged by the acceptor (the same line for SMTP and sendmail).
        metrics.message_received(getattr(server, "listener", "smtp"))
        self.on_accept(meta)
        return f"250 2.0.0 Ok: queued as {meta.id}"

    def authenticator(self, server: SMTP, session: Session, envelope: Envelope, mechanism: str,
                      auth_data: Any) -> Any:
        """aiosmtpd's (synchronous) authenticator hook: only hands the credentials on.

        The scrypt check costs ~50 ms of CPU; run here it would stall every client of the process
        (issue 10 item 8), and aiosmtpd cannot await an authenticator. So this returns a
        `PendingCheck` that RelaySMTP's auth_PLAIN/auth_LOGIN complete with `check_credentials`.
        """
        from aiosmtpd.smtp import AuthResult, LoginPassword

        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        return AuthResult(success=False, handled=False, auth_data=PendingCheck(auth_data))

    async def check_credentials(self, session: Session, credentials: Any) -> Any:
        """The AuthResult for a LoginPassword, with the scrypt work in the AUTH thread pool."""
        from aiosmtpd.smtp import AuthResult

        user = credentials.login.decode("utf-8", "replace")
        password = credentials.password.decode("utf-8", "replace")
        stored = self.users.get(user)
        # An unknown user costs the same scrypt as a wrong password: no user enumeration by timing.
        checked = await asyncio.get_running_loop().run_in_executor(
            _auth_pool(), _verify, password, stored)
        ok = stored is not None and checked
        peer = session.peer[0] if isinstance(session.peer, tuple) else "?"
        if not ok:
            # The password is never logged; the user name is (escaped), to make brute force visible.
            log.event("refused", client=peer, user=log_safe(user, 64), reason="authentication failed")
            return AuthResult(success=False, handled=False)
        log.event("authenticated", client=peer, user=log_safe(user, 64))
        return AuthResult(success=True, auth_data=user)


# aiosmtpd checks the EHLO hook's signature (4 or 5 arguments) on every new connection; inspect
# takes a function's own __signature__ when it has one, so that work is done once here.
SubmissionHandler.handle_EHLO.__signature__ = inspect.signature(SubmissionHandler.handle_EHLO)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class PendingCheck:
    """Credentials received by aiosmtpd, still to be checked off the event loop."""

    credentials: Any  # aiosmtpd.smtp.LoginPassword


# Bounded concurrency for password hashing: at most this many scrypt runs at once per process
# (each up to 64 MiB, auth._entry_problem); further AUTH attempts wait their turn in the pool's
# queue, which the connection cap and the per-address AUTH lock (listener) keep bounded.
AUTH_THREADS = 2
_POOL: list[concurrent.futures.ThreadPoolExecutor] = []


def _auth_pool() -> concurrent.futures.ThreadPoolExecutor:
    if not _POOL:  # created on first use, so a forked listener child makes its own
        _POOL.append(concurrent.futures.ThreadPoolExecutor(AUTH_THREADS, thread_name_prefix="mta-auth"))
    return _POOL[0]


def _verify(password: str, stored: str | None) -> bool:
    from mta.submission.auth import verify_password

    return verify_password(password, stored or _dummy_hash())
