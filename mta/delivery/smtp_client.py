"""One outbound SMTP session to one MX address, on aiosmtplib; library errors are mapped here only.

Rule: `SmtpSession.open` either returns a session that has greeted, said EHLO (HELO only after
500/502, SMTP-14) and, where offered or required, completed STARTTLS and said EHLO again
(SMTP-15) - or raises a `TransientDeliveryError` so the caller tries the next address (SMTP-23).
TLS modes:

- `TlsMode.MAY` (no policy, testing, none): STARTTLS when offered with an unverifying context;
  the certificate is still checked after the fact so `tls.verified` tells what enforce would have
  said. A failed handshake is retried once in plaintext on a fresh connection (SMTP-16 decision).
- `TlsMode.VERIFY` (enforce, verified relayhost): STARTTLS is required and OpenSSL checks chain,
  validity, DNS-ID of the MX host name (STS-77/78) and TLS >= 1.2 (STS-80); SNI is the MX name
  (STS-79). Any failure raises `TlsRequiredError` whose `result_type` follows STS-92, and nothing is
  ever sent in plaintext (STS-75/76): no MAIL FROM on that connection.
- `TlsMode.REQUIRE` (DANE): STARTTLS is mandatory exactly as with VERIFY, but the handshake does
  not judge the certificate: the caller does, from `peer_chain`, before MAIL FROM (DANE-2/5).
  `sni` overrides the server name sent (DANE-6: the TLSA base domain).

`send` runs one transaction and reports per recipient (SMTP-19): RCPT replies as given, except
452/552 which mean "too many recipients, try later" (SMTP-18); DATA only if a RCPT was accepted,
else RSET (SMTP-20); the DATA replies apply to every accepted recipient (SMTP-21). MAIL 5xx is
final for all; MAIL 4xx, or the connection lost at MAIL, raises so the next host is tried
(SMTP-23). A lost connection or a timeout after MAIL leaves every recipient without a final
answer at 451 4.4.2 (SMTP-22, SMTP-32). Every command has its own timeout (SMTP-31, §4.5.3.2).

Pipelining (PERF-6, RFC 2920): when the last EHLO offered PIPELINING, MAIL, every RCPT and DATA
leave in one write and the replies are read in order, each with its own timeout; the body only
after 354, and the rules above apply reply by reply. Every command is built before anything is
written, so an address that cannot be sent is a 553 with nothing sent. After a refused MAIL the
replies to the RCPTs and DATA (503) are read before the connection may serve again; with nobody
accepted, DATA's refusal is followed by RSET, and a 354 all the same gets just the terminating dot
(RFC 2920 §3.1). Replies, pipelined or not, are read by mta.delivery.pipeline.ReplyReader.

A hostile or broken server is contained here: a reply is at most aiosmtplib's 32 KiB (an endless
multi-line reply fails at once), a refusal must be 4yz/5yz, DATA must get 354 and the end of data
2yz (RFC 5321 §4.2.1, §4.3.2). Anything else - a code outside the protocol, a malformed or
over-long reply - is 451 4.5.0 for every recipient still open and the connection is dropped, never
reused: it can neither count as delivered nor as bounced. Reply text is made one printable line of
at most REPLY_TEXT_LIMIT characters, since it lands in the state file, the logs and DSNs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import aiosmtplib
from aiosmtplib import SMTPException, SMTPResponseException, SMTPServerDisconnected

from mta.delivery.pipeline import ReplyReader
from mta.delivery.smtp_connect import (
    CONNECTION_ERRORS,
    REPLY_TEXT_LIMIT,
    BindAddresses,
    Timeouts,
    TlsMode,
    TlsRequiredError,
    is_refusal,
    local_address,
    one_line,
    open_connection,
    protocol_error,
    quit_quietly,
    remote_reply,
)
from mta.delivery.wire import crlf_body, dot_stuffed, mail_command, rcpt_command
from mta.errors import TransientDeliveryError
from mta.model import SmtpReply, TlsInfo

__all__ = ["REPLY_TEXT_LIMIT", "BindAddresses", "SmtpSession", "Timeouts", "TlsMode", "TlsRequiredError",
           "TransactionResult", "one_line"]

_DATA_CHUNK = 64 * 1024


@dataclass(frozen=True)
class TransactionResult:
    """Per-recipient replies of one transaction (250 after DATA, or the error that applies)."""

    replies: dict[str, SmtpReply]
    mail_reply: SmtpReply | None = None
    data_reply: SmtpReply | None = None


class SmtpSession:
    """An open, greeted SMTP connection; see the module docstring for what `open` guarantees."""

    def __init__(self, smtp: aiosmtplib.SMTP, *, relay: str, timeouts: Timeouts, tls: TlsInfo | None,
                 starttls_offered: bool, peer_chain: Sequence[bytes] = ()) -> None:
        self._smtp = smtp
        self.peer_chain = tuple(peer_chain)  # DER, leaf first, as presented (empty without TLS)
        self.relay = relay  # "mx.example.com[192.0.2.1]:25", for messages
        self.timeouts = timeouts
        self.tls = tls  # None: STARTTLS not attempted; version None: plaintext after a TLS failure
        self.starttls_offered = starttls_offered  # advertised and not refused with 4xx/5xx (STS-92)
        # Capabilities of the last EHLO (after TLS, if any); aiosmtplib forgets them on close.
        ext = dict(smtp.esmtp_extensions)
        self.extensions = ext
        self.peer_size_limit = _size_limit(ext.get("size"))
        self.supports_8bitmime = "8bitmime" in ext
        self.supports_smtputf8 = "smtputf8" in ext
        self.pipelining = "pipelining" in ext  # RFC 2920: MAIL, RCPTs and DATA in one write (PERF-6)
        self.local_address = local_address(smtp)  # RFC 8460 sending-mta-ip (issue 10 item 11)
        self.last_used = time.monotonic()
        self._usable = True
        # No transaction open on the connection (just greeted, or the last one ended with its
        # reply to the end of data, a refused MAIL, or RSET): the next MAIL needs no RSET first.
        self.idle = True
        # MAIL FROM found the connection closed (nothing was sent for the message): on a reused
        # connection this is the server having let go while it sat in the pool.
        self.lost_at_mail = False

    # --- opening ------------------------------------------------------------------------------
    @classmethod
    async def open(cls, *, address: str, port: int, mx_host: str, helo_name: str, tls_mode: TlsMode,
                   ca_file: str | None, timeouts: Timeouts, bind: BindAddresses | None = None,
                   sni: str | None = None) -> SmtpSession:
        relay = f"{mx_host.rstrip('.')}[{address}]:{port}"
        opened = await open_connection(address=address, port=port, relay=relay, mx_host=mx_host, helo_name=helo_name,
                                       tls_mode=tls_mode, ca_file=ca_file, timeouts=timeouts,
                                       bind=bind or BindAddresses(), sni=sni)
        return cls(opened.smtp, relay=relay, timeouts=timeouts, tls=opened.tls,
                   starttls_offered=opened.starttls_offered, peer_chain=opened.peer_chain)

    async def login(self, username: str, password: str) -> None:
        """AUTH to a relay host; any failure is transient so the message stays queued.

        On failure the connection is closed: the caller abandons the session. Credentials never
        travel without TLS (issue 10 item 6; Postfix's `smtp_sasl_security_options = noplaintext`
        default): a `relayhost_tls = "may"` session that ended up in plaintext (no STARTTLS offered,
        refused, or the plaintext retry of a failed handshake, SMTP-16) is deferred with the reason.
        """
        if self.tls is None or self.tls.version is None:
            why = "it does not offer STARTTLS" if self.tls is None else f"TLS failed ({self.tls.error})"
            await self.close()
            raise TransientDeliveryError(SmtpReply(
                451, f"{self.relay}: AUTH credentials are never sent without TLS, and {why}", "4.7.0"))
        try:
            await self._smtp.login(username, password, timeout=self.timeouts.ehlo)
        except SMTPResponseException as exc:
            self._broken()
            if not is_refusal(exc.code):
                raise TransientDeliveryError(protocol_error(self.relay, "AUTH", exc.code, exc.message)) from exc
            raise TransientDeliveryError(remote_reply(exc.code, exc.message)) from exc
        except CONNECTION_ERRORS as exc:
            self._broken()
            raise TransientDeliveryError(self._failure(exc, "AUTH")) from exc
        except SMTPException as exc:
            self._broken()
            raise TransientDeliveryError(SmtpReply(451, f"{self.relay}: {exc}", "4.7.0")) from exc
        self.last_used = time.monotonic()

    # --- one transaction ------------------------------------------------------------------------
    async def send(self, mail_from: str, rcpts: Sequence[str], data: bytes, *, eight_bit: bool = False,
                   smtputf8: bool = False) -> TransactionResult:
        """MAIL, RCPT per recipient, DATA; a reply per recipient. Raises only for MAIL 4xx/connection loss."""
        try:
            return await self._transaction(mail_from, list(dict.fromkeys(rcpts)), data, eight_bit, smtputf8)
        except asyncio.CancelledError:
            self._broken()  # half a transaction: the connection cannot be trusted any more
            raise

    async def _transaction(self, mail_from: str, rcpts: list[str], data: bytes, eight_bit: bool,
                           smtputf8: bool) -> TransactionResult:
        self.last_used = time.monotonic()
        body = crlf_body(data)  # aiosmtplib's CRLF rules (SMTP-26)
        refusal = self._refusal(len(body), eight_bit, smtputf8)
        if refusal is not None:
            return TransactionResult({r: refusal for r in rcpts})
        options = []
        if "size" in self.extensions:
            options.append(f"SIZE={len(body)}")  # SMTP-29, RFC 1870
        if eight_bit:
            options.append("BODY=8BITMIME")  # RFC 6152
        if smtputf8:
            options.append("SMTPUTF8")  # RFC 6531
        # Every command is made before anything is written: a bad address is a 553 with nothing sent.
        try:
            mail = mail_command(mail_from, options, smtputf8)
        except ValueError as exc:  # includes UnicodeEncodeError
            reply = SmtpReply(553, f"sender {mail_from!r} cannot be sent: {exc}",
                              "5.6.7" if isinstance(exc, UnicodeError) else "5.1.7")
            return TransactionResult({r: reply for r in rcpts}, reply)
        replies: dict[str, SmtpReply] = {}
        envelope: list[tuple[str, bytes]] = []
        for rcpt in rcpts:
            try:
                envelope.append((rcpt, rcpt_command(rcpt, smtputf8)))
            except ValueError as exc:
                replies[rcpt] = SmtpReply(553, f"recipient {rcpt!r} cannot be sent: {exc}",
                                          "5.6.7" if isinstance(exc, UnicodeError) else "5.1.3")
        if not envelope:
            return TransactionResult(replies)
        try:
            reader = ReplyReader.attach(self._smtp.protocol)
        except SMTPServerDisconnected as exc:  # gone before MAIL could be written
            self._broken()
            self.lost_at_mail = True
            raise TransientDeliveryError(self._failure(exc, "MAIL FROM")) from exc
        try:
            return await self._exchange(reader, mail, envelope, body, replies, rcpts)
        finally:
            if not reader.detach():
                self._broken()  # a reply too many, half a reply or a failure: out of step for good

    async def _exchange(self, reader: ReplyReader, mail: bytes, envelope: list[tuple[str, bytes]], body: bytes,
                        replies: dict[str, SmtpReply], rcpts: list[str]) -> TransactionResult:
        """MAIL, RCPTs, DATA: one write when the server offers PIPELINING (PERF-6, RFC 2920), else one by one."""
        t = self.timeouts
        self.idle = False
        pipelined = self.pipelining
        try:
            if pipelined:  # RFC 2920 §3.1: DATA is the last command of the group
                reader.send(b"".join([mail, *(cmd for _, cmd in envelope), b"DATA\r\n"]), len(envelope) + 2)
            else:
                reader.send(mail, 1)
            resp = await reader.reply(t.mail)
        except (*CONNECTION_ERRORS, SMTPException) as exc:
            self._broken()
            self.lost_at_mail = isinstance(exc, SMTPServerDisconnected | ConnectionError)
            raise TransientDeliveryError(self._failure(exc, "MAIL FROM")) from exc
        if resp.code != 250:
            if not is_refusal(resp.code):
                self._broken()
                raise TransientDeliveryError(protocol_error(self.relay, "MAIL FROM", resp.code, resp.message))
            reply = remote_reply(resp.code, resp.message)
            # A refused MAIL opens no transaction (RFC 5321 §4.1.1.2); pipelined, the replies to the
            # RCPTs and DATA (503) are read first so none is taken for the next command's.
            self.idle = not pipelined or await self._skip(reader, len(envelope) + 1)
            if reply.permanent:  # SMTP-23: 5yz to MAIL is final for every recipient (never cached, SMTP-24)
                return TransactionResult({r: reply for r in rcpts}, reply)
            raise TransientDeliveryError(reply)  # SMTP-23: 4yz to MAIL -> next host
        mail_reply = remote_reply(resp.code, resp.message)
        accepted: list[str] = []
        for i, (rcpt, command) in enumerate(envelope):
            try:
                if not pipelined:
                    reader.send(command, 1)
                resp = await reader.reply(t.rcpt)
            except (*CONNECTION_ERRORS, SMTPException) as exc:
                self._broken()
                lost = self._failure(exc, "RCPT TO")
                replies.update({r: lost for r in [*accepted, *(r for r, _ in envelope[i:])]})  # SMTP-22
                return TransactionResult(replies, mail_reply)
            if resp.code in (250, 251):
                accepted.append(rcpt)
                replies[rcpt] = remote_reply(resp.code, resp.message)
            elif is_refusal(resp.code):
                replies[rcpt] = _rcpt_reply(resp.code, resp.message)
            else:
                # Neither accepted nor refused: this and every other open recipient waits (SMTP-22).
                self._broken()
                odd = protocol_error(self.relay, "RCPT TO", resp.code, resp.message)
                replies.update({r: odd for r in [*accepted, *(r for r, _ in envelope[i:])]})
                return TransactionResult(replies, mail_reply)
        if not accepted:
            await self._abandon(reader, pipelined)  # SMTP-20: nobody to send to, so no message
            return TransactionResult(replies, mail_reply)
        try:
            data_reply = await self._data(reader, body, pipelined)
        except (*CONNECTION_ERRORS, SMTPException) as exc:
            self._broken()
            lost = self._failure(exc, "DATA")  # SMTP-32: may duplicate, never bounce
            replies.update({r: lost for r in accepted})
            return TransactionResult(replies, mail_reply)
        replies.update({r: data_reply for r in accepted})  # SMTP-21
        self.last_used = time.monotonic()
        return TransactionResult(replies, mail_reply, data_reply)

    async def _skip(self, reader: ReplyReader, count: int) -> bool:
        """Read the replies to the rest of a pipelined group after MAIL was refused; True if it ended cleanly."""
        try:
            for i in range(count):
                resp = await reader.reply(self.timeouts.data_init if i == count - 1 else self.timeouts.rcpt)
                if resp.code == 354 or not is_refusal(resp.code):
                    break  # DATA accepted without a transaction, or nonsense: this server is out of step
            else:
                return True
        except (*CONNECTION_ERRORS, SMTPException):
            pass
        self._broken()
        return False

    async def _abandon(self, reader: ReplyReader, pipelined: bool) -> None:
        """No recipient accepted (SMTP-20): end the transaction without a message, then RSET.

        Pipelined, DATA was already sent: its refusal (503/554) is read; if the server said 354 all
        the same, only the terminating dot is sent (RFC 2920 §3.1) and its reply ends the transaction.
        """
        t = self.timeouts
        try:
            if pipelined:
                resp = await reader.reply(t.data_init)
                if resp.code == 354:
                    reader.send(b".\r\n", 1)
                    resp = await reader.reply(t.data_final)
                    if 200 <= resp.code <= 599:
                        self.idle = True
                        return
                if not is_refusal(resp.code):
                    self._broken()
                    return
            reader.send(b"RSET\r\n", 1)
            resp = await reader.reply(t.mail)
        except (*CONNECTION_ERRORS, SMTPException):
            self._broken()
            return
        if resp.code != 250:
            self._broken()
            return
        self.idle = True

    def _refusal(self, size: int, eight_bit: bool, smtputf8: bool) -> SmtpReply | None:
        """A permanent reply when this peer cannot take the message as it is (nothing is sent)."""
        if self.peer_size_limit is not None and size > self.peer_size_limit:  # SMTP-29
            return SmtpReply(552, f"message size {size} exceeds the limit {self.peer_size_limit} of {self.relay}",
                             "5.3.4")
        if eight_bit and not self.supports_8bitmime:  # SMTP-30 decision: bounce, no downgrade
            return SmtpReply(554, f"8-bit message but {self.relay} does not offer 8BITMIME", "5.6.3")
        if smtputf8 and not self.supports_smtputf8:
            return SmtpReply(553, f"internationalised addresses but {self.relay} does not offer SMTPUTF8",
                             "5.6.7")
        return None

    async def _data(self, reader: ReplyReader, body: bytes, pipelined: bool) -> SmtpReply:
        """DATA with its three timeouts (SMTP-31): 354, each block written, final reply.

        aiosmtplib's public `data()` has one timeout for all of it and hands the whole body to the
        transport without waiting (tests/integration/test_library_gaps.py), so the steps are spelt
        out here: each block waits while the transport's buffer is full, as StreamWriter.drain() does.
        """
        t = self.timeouts
        if not pipelined:
            reader.send(b"DATA\r\n", 1)
        resp = await reader.reply(t.data_init)
        if resp.code != 354:
            return self._refusal_or_error(resp.code, resp.message, "DATA")
        payload = dot_stuffed(body)  # SMTP-25
        for start in range(0, len(payload), _DATA_CHUNK):
            last = start + _DATA_CHUNK >= len(payload)
            reader.send(payload[start:start + _DATA_CHUNK], 1 if last else 0)
            if not last:
                await reader.drain(t.data_block)
        resp = await reader.reply(t.data_final)
        self.idle = True  # the reply to the end of data, whatever it says, ends the transaction (§4.1.1.4)
        if 200 <= resp.code <= 299:
            return remote_reply(resp.code, resp.message)
        return self._refusal_or_error(resp.code, resp.message, "the end of data")

    def _refusal_or_error(self, code: int, message: str, step: str) -> SmtpReply:
        """A 4yz/5yz reply as given; anything else is a protocol error that ends the connection."""
        if is_refusal(code):
            return remote_reply(code, message)
        self._broken()
        return protocol_error(self.relay, step, code, message)

    # --- reuse and closing -------------------------------------------------------------------------
    async def reset(self) -> bool:
        """RSET before reusing the connection; False if it can no longer be used."""
        if not self._usable or not self._smtp.is_connected:
            return False
        try:
            await self._smtp.rset(timeout=self.timeouts.mail)
        except (*CONNECTION_ERRORS, SMTPException):
            self._broken()
            return False
        self.last_used = time.monotonic()
        self.idle = True
        return True

    async def close(self) -> None:
        """QUIT (best effort) and close."""
        self._usable = False
        await quit_quietly(self._smtp, self.timeouts)

    @property
    def usable(self) -> bool:
        return self._usable and self._smtp.is_connected

    def _broken(self) -> None:
        self._usable = False
        self._smtp.close()

    def _failure(self, exc: BaseException, step: str) -> SmtpReply:
        if isinstance(exc, TimeoutError):
            return SmtpReply(451, f"timeout at {step} with {self.relay}", "4.4.2")
        if isinstance(exc, SMTPResponseException) and not is_refusal(exc.code):
            return protocol_error(self.relay, step, exc.code, exc.message)
        return SmtpReply(451, f"connection to {self.relay} lost at {step}: {exc}", "4.4.2")


def _size_limit(value: str | None) -> int | None:
    """RFC 1870: `SIZE n`; 0 or no number means no fixed limit."""
    if not value:
        return None
    head = value.split()[0]
    return int(head) if head.isdigit() and int(head) > 0 else None


def _rcpt_reply(code: int, message: str) -> SmtpReply:
    """SMTP-18: 452, and 552 to RCPT (RFC 5321 §4.5.3.1.10), mean "too many recipients": retry later."""
    reply = remote_reply(code, message)
    if code == 552:
        enhanced = "4" + reply.enhanced[1:] if reply.enhanced else "4.5.3"
        return SmtpReply(452, f"{reply.text} (552 to RCPT taken as temporary)".strip(), enhanced)
    return reply
