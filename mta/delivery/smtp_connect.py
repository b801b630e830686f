"""Opening one outbound SMTP connection: TCP from the configured source address, greeting,
EHLO (HELO only after 500/502, SMTP-14) and STARTTLS as the TLS mode demands.

`open_connection` either returns a greeted connection that has, where offered or required,
completed STARTTLS and said EHLO again (SMTP-15), or raises `TransientDeliveryError` so the caller
tries the next address (SMTP-23). The TLS modes are described in mta.delivery.smtp_client; what
happens on the connection afterwards (AUTH, transactions) lives there too. The reply helpers here
turn remote text into one printable, bounded line (a hostile server is contained, RFC 5321 §4.2.1).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import os
import socket
import ssl
from dataclasses import dataclass

import aiosmtplib
from aiosmtplib import (
    SMTPConnectError,
    SMTPConnectResponseError,
    SMTPConnectTimeoutError,
    SMTPException,
    SMTPHeloError,
    SMTPResponseException,
    SMTPServerDisconnected,
)

from mta.errors import HostUnreachableError, TransientDeliveryError
from mta.model import SmtpReply, TlsInfo
from mta.net.tls import opportunistic_context, peer_chain, reference_name, tls_info, verify_chain, verifying_context

REPLY_TEXT_LIMIT = 1000  # characters of remote reply text we keep
# OpenSSL X509_V_ERR_* codes -> RFC 8460 result types (STS-92).
_VERIFY_RESULT = {
    9: "certificate-expired", 10: "certificate-expired",  # not yet valid, has expired
    62: "certificate-host-mismatch",
    2: "certificate-not-trusted", 18: "certificate-not-trusted", 19: "certificate-not-trusted",
    20: "certificate-not-trusted", 21: "certificate-not-trusted", 27: "certificate-not-trusted",
    28: "certificate-not-trusted",
}
# Connection trouble as aiosmtplib, asyncio and the socket layer raise it.
CONNECTION_ERRORS = (SMTPServerDisconnected, TimeoutError, OSError)


@dataclass(frozen=True)
class Timeouts:
    """Seconds per step; defaults are RFC 5321 §4.5.3.2's minimums (SMTP-31)."""

    connect: float = 30.0
    greeting: float = 300.0
    ehlo: float = 300.0  # also STARTTLS, the TLS handshake, HELO, AUTH
    mail: float = 300.0  # also RSET
    rcpt: float = 300.0
    data_init: float = 120.0
    data_block: float = 180.0
    data_final: float = 600.0


class TlsMode(enum.Enum):
    MAY = "may"
    VERIFY = "verify"
    REQUIRE = "require"  # DANE: mandatory as VERIFY; the caller judges `peer_chain` (DANE-2/5)


class TlsRequiredError(TransientDeliveryError):
    """TLS was required (VERIFY) and this host could not provide it; never a reason to bounce."""

    def __init__(self, result_type: str, reason: str, local_address: str | None = None) -> None:
        super().__init__(SmtpReply(451, f"TLS required by policy: {reason}", "4.7.5"))
        self.result_type = result_type
        self.reason = reason
        self.local_address = local_address  # our end of the refused session (RFC 8460 sending-mta-ip)


@dataclass(frozen=True)
class Opened:
    """A greeted connection and what its STARTTLS gave (see SmtpSession for the meaning)."""

    smtp: aiosmtplib.SMTP
    tls: TlsInfo | None
    starttls_offered: bool
    peer_chain: tuple[bytes, ...] = ()  # DER, leaf first, as presented


def remote_reply(code: int, message: str) -> SmtpReply:
    return SmtpReply.parse(code, one_line(message))


def one_line(message: str) -> str:
    """Remote reply text as one printable line (multi-line replies joined), capped in length."""
    text = " ".join(part.strip() for part in message.splitlines() if part.strip())
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[: REPLY_TEXT_LIMIT * 2])
    return text if len(text) <= REPLY_TEXT_LIMIT else text[: REPLY_TEXT_LIMIT - 3] + "..."


def is_refusal(code: int) -> bool:
    """A reply code that means "not now" or "never" (RFC 5321 §4.2.1); anything else is a protocol error."""
    return 400 <= code <= 599


def protocol_error(relay: str, step: str, code: int, message: str) -> SmtpReply:
    """451 4.5.0 for a reply outside the protocol (odd code, malformed, over-long: aiosmtplib's code -1)."""
    got = one_line(message) if code < 0 else f"{code} {one_line(message)}"
    return SmtpReply(451, f"{relay}: invalid reply to {step}: {got}"[:REPLY_TEXT_LIMIT], "4.5.0")


def _handshake_failure(exc: BaseException) -> tuple[str, str]:
    """(TLS-RPT result type, reason) for an exception out of STARTTLS's handshake (STS-92)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (_VERIFY_RESULT.get(exc.verify_code, "validation-failure"),
                f"certificate verify failed: {exc.verify_message}")
    if isinstance(exc, ssl.SSLError):
        # The failure-reason-code is OpenSSL's error name (e.g. TLSV1_ALERT_PROTOCOL_VERSION).
        return "validation-failure", f"TLS handshake failed: {exc.reason or exc}"
    if isinstance(exc, TimeoutError):
        return "validation-failure", f"TLS handshake failed: timeout ({exc})"
    return "validation-failure", f"TLS handshake failed: {exc}"


async def open_connection(*, address: str, port: int, relay: str, mx_host: str, helo_name: str,
                          tls_mode: TlsMode, ca_file: str | None, timeouts: Timeouts, bind: BindAddresses,
                          sni: str | None = None) -> Opened:
    """Connect, greet, EHLO and STARTTLS as `tls_mode` demands (see the module docstring)."""
    try:
        ctx = verifying_context(ca_file) if tls_mode is TlsMode.VERIFY else opportunistic_context()
    except (OSError, ssl.SSLError) as exc:  # our own trust store is broken: not the MX's fault
        raise TransientDeliveryError(SmtpReply(451, f"cannot load CA file {ca_file}: {exc}", "4.7.5")) from exc
    smtp = await _connect(address, port, relay, helo_name, timeouts, bind)
    try:
        return await _secure(smtp, address=address, port=port, relay=relay, mx_host=mx_host, helo_name=helo_name,
                             tls_mode=tls_mode, ctx=ctx, ca_file=ca_file, timeouts=timeouts, bind=bind, sni=sni)
    except asyncio.CancelledError:
        smtp.close()
        raise


async def _secure(smtp: aiosmtplib.SMTP, *, address: str, port: int, relay: str, mx_host: str, helo_name: str,
                  tls_mode: TlsMode, ctx: ssl.SSLContext, ca_file: str | None, timeouts: Timeouts,
              bind: BindAddresses, sni: str | None = None) -> Opened:
    """STARTTLS as the mode demands on a greeted connection (see the module docstring)."""
    offered, mandatory = smtp.supports_extension("starttls"), tls_mode is not TlsMode.MAY
    local = local_address(smtp)
    if not offered:
        if mandatory:
            await quit_quietly(smtp, timeouts)  # STS-75: no MAIL FROM, just QUIT
            raise TlsRequiredError("starttls-not-supported", f"{relay} does not offer STARTTLS", local)
        return Opened(smtp, None, False)
    # STS-79: the MX name, A-labels, no trailing dot, never an IP; DANE-6: the TLSA base domain.
    sni = reference_name(sni or mx_host)
    if mandatory and sni is None:
        await quit_quietly(smtp, timeouts)
        raise TlsRequiredError("validation-failure", f"{relay}: no host name to verify a certificate against",
                               local)
    try:
        await smtp.starttls(server_hostname=sni, tls_context=ctx, timeout=timeouts.ehlo)
    except SMTPResponseException as exc:
        refused = f"STARTTLS refused: {remote_reply(exc.code, exc.message)}"
        if mandatory:  # STS-92: a 4xx/5xx to STARTTLS counts as "not supported"
            await quit_quietly(smtp, timeouts)
            raise TlsRequiredError("starttls-not-supported", f"{relay}: {refused}", local) from exc
        if not smtp.is_connected or not is_refusal(exc.code):
            # 421: the server hung up; an invalid reply: the connection's state is unknown.
            smtp.close()
            smtp = await _connect(address, port, relay, helo_name, timeouts, bind)
        # Refused is reported like not offered (STS-92), so starttls_offered is False.
        return Opened(smtp, TlsInfo(error=refused), False)
    except (SMTPException, OSError, TimeoutError, ValueError) as exc:
        smtp.close()
        result_type, reason = _handshake_failure(exc)
        if mandatory:
            raise TlsRequiredError(result_type, f"{relay}: {reason}", local) from exc  # STS-76: no plaintext retry
        # SMTP-16 decision: opportunistic TLS that fails is retried once, in plaintext, on a new connection.
        smtp = await _connect(address, port, relay, helo_name, timeouts, bind)
        return Opened(smtp, TlsInfo(error=reason), True)
    ssl_object = smtp.get_transport_info("ssl_object")
    chain = tuple(peer_chain(ssl_object))
    if tls_mode is TlsMode.VERIFY:
        info = tls_info(ssl_object, True, None)  # OpenSSL already refused anything unverified
    elif tls_mode is TlsMode.REQUIRE:
        info = tls_info(ssl_object, False, None)  # the caller judges `peer_chain` (DANE)
    else:
        verified, error = verify_chain(chain, ca_file, mx_host)  # what verify_peer does, chain kept
        info = tls_info(ssl_object, verified, error)
    await _ehlo(smtp, helo_name, relay, timeouts)  # SMTP-15: pre-TLS capabilities are void
    return Opened(smtp, info, True, chain)


@dataclass(frozen=True)
class BindAddresses:
    """Local source addresses of outgoing connections ("" = the kernel's choice), as Postfix's
    smtp_bind_address / smtp_bind_address6: hosts with several addresses need them for SPF and
    reputation (issue 10 item 10)."""

    ipv4: str = ""
    ipv6: str = ""


def local_address(smtp: aiosmtplib.SMTP) -> str | None:
    """Our IP address on this connection (getsockname), or None when it is gone."""
    sockname = smtp.get_transport_info("sockname") if smtp.is_connected else None
    return str(sockname[0]) if sockname else None


async def _connect(address: str, port: int, relay: str, helo_name: str, timeouts: Timeouts,
                   bind: BindAddresses) -> aiosmtplib.SMTP:
    """TCP connect, greeting and EHLO/HELO, each under its own timeout; failures are transient."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    except ValueError:
        raise TransientDeliveryError(SmtpReply(421, f"connect to {relay}: not an IP address", "4.4.1")) from None
    source = bind.ipv6 if family == socket.AF_INET6 else bind.ipv4
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        if source:
            try:
                sock.bind((source, 0))
            except OSError as exc:  # the address left this host since start-up: our problem, not the MX's
                raise TransientDeliveryError(SmtpReply(
                    451, f"connect to {relay}: cannot bind source address {source}: {exc.strerror}", "4.4.1"),
                ) from None
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (address, port)), timeouts.connect)
    except TimeoutError:
        sock.close()
        raise HostUnreachableError(SmtpReply(421, f"connect to {relay}: timed out", "4.4.1")) from None
    except BaseException as exc:
        sock.close()
        if not isinstance(exc, OSError):
            raise
        # asyncio words every failure "Connect call failed"; the errno says what happened.
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise HostUnreachableError(SmtpReply(421, f"connect to {relay}: {reason}", "4.4.1")) from None
    smtp = aiosmtplib.SMTP(sock=sock, local_hostname=helo_name, timeout=timeouts.greeting, start_tls=False)
    try:
        await smtp.connect(timeout=timeouts.greeting)
    except SMTPConnectResponseError as exc:
        smtp.close()
        if not is_refusal(exc.code):
            raise TransientDeliveryError(protocol_error(relay, "the greeting", exc.code, exc.message)) from exc
        # SMTP-23: 4yz greeting, and (decision) 5yz greeting too, only rule out this host.
        raise TransientDeliveryError(remote_reply(exc.code, exc.message)) from exc
    except SMTPConnectTimeoutError:
        smtp.close()
        raise HostUnreachableError(SmtpReply(421, f"no greeting from {relay} (timeout)", "4.4.2")) from None
    except (SMTPConnectError, SMTPResponseException, *CONNECTION_ERRORS, SMTPException) as exc:
        smtp.close()
        raise TransientDeliveryError(SmtpReply(421, f"{relay} lost before greeting: {exc}", "4.4.2")) from None
    await _ehlo(smtp, helo_name, relay, timeouts)
    return smtp


async def _ehlo(smtp: aiosmtplib.SMTP, helo_name: str, relay: str, timeouts: Timeouts) -> None:
    """EHLO; HELO only when EHLO is unknown to the server (500/502, SMTP-14)."""
    try:
        try:
            await smtp.ehlo(hostname=helo_name, timeout=timeouts.ehlo)
        except SMTPHeloError as exc:
            if exc.code not in (500, 502) or not smtp.is_connected:
                raise
            await smtp.helo(hostname=helo_name, timeout=timeouts.ehlo)
    except SMTPResponseException as exc:
        smtp.close()
        if not is_refusal(exc.code):
            raise TransientDeliveryError(protocol_error(relay, "EHLO", exc.code, exc.message)) from exc
        raise TransientDeliveryError(remote_reply(exc.code, exc.message)) from exc  # SMTP-23: next host
    except asyncio.CancelledError:
        smtp.close()
        raise
    except (*CONNECTION_ERRORS, SMTPException) as exc:
        smtp.close()
        what = "timeout" if isinstance(exc, TimeoutError) else f"connection lost: {exc}"
        raise TransientDeliveryError(SmtpReply(421, f"EHLO to {relay}: {what}", "4.4.2")) from exc


async def quit_quietly(smtp: aiosmtplib.SMTP, timeouts: Timeouts) -> None:
    if smtp.is_connected:
        with contextlib.suppress(*CONNECTION_ERRORS, SMTPException):
            await smtp.quit(timeout=min(timeouts.ehlo, 10.0))
    smtp.close()

