"""Fake receiving MX hosts for tests: real aiosmtpd servers on 127.0.0.x (the O-MX observable).

Rule: a FakeMx is a real SMTP server speaking over a real socket; a test changes only its
*behaviour* (what it advertises and answers) and reads only its *transcript* (what a remote MX
could observe). Nothing in the relay is mocked.

Behaviour knobs (constructor keywords, also plain attributes a test may change between sessions):

- ``tls_context``: an ``ssl.SSLContext`` (e.g. ``TestPki.leaf(...).server_context()``) -> STARTTLS
  offered. Its ``sni_callback`` is wrapped to record the SNI name, so give each FakeMx its own context.
- ``broken_tls``: advertise STARTTLS, answer ``220``, then send garbage and close (handshake fails).
- ``greeting``: a non-220 greeting line (``"421 4.3.2 busy"``, ``"554 5.7.1 go away"``); the server
  closes after sending it. ``stall_greeting``: accept the TCP connection and never greet.
- ``replies``: ``{verb: reply line}`` overrides, verbs ``EHLO HELO STARTTLS MAIL RCPT DATA RSET QUIT
  NOOP`` plus ``DATA_END`` (the reply after the final dot). ``DATA`` replaces the ``354``.
- ``rcpt_replies``: ``{address: reply}`` per recipient (case-insensitive), e.g. ``USER_UNKNOWN``.
- ``max_rcpts``: accept at most N recipients per transaction, then ``452 4.5.3`` (SMTP-18).
- ``drop_after``: a verb (or ``DATA_END``) at which the server closes without replying.
- ``stall_at``: a verb (or ``DATA_END``) at which the server never replies.
- ``size_limit``: advertised and enforced ``SIZE`` (None: not advertised).
- ``eightbitmime`` (default True) / ``smtputf8`` (default False) / ``pipelining`` (default False,
  RFC 2920; aiosmtpd answers pipelined commands in order either way): advertised extensions.
- ``credentials``: ``{user: password}`` enables AUTH PLAIN/LOGIN (over TLS if ``tls_context``).

Transcript: ``sessions`` (one ``MxSession`` per TCP connection: connect time, peer, EHLO/HELO
names, every command line, STARTTLS attempted/completed, SNI, TLS version, handshake error,
authenticated user), ``messages`` (every accepted message: envelope, bytes as received after
dot-unstuffing, TLS version, SNI) and ``errors`` (exceptions inside the server, e.g. failed
handshakes). The null reverse-path is recorded as ``"<>"`` (aiosmtpd's form).

Two ways to run it:

    async with FakeMx("127.0.0.21", tls_context=leaf.server_context()) as mx:   # caller's loop
        ... deliver to ("127.0.0.21", mx.port) ...
        [msg] = await mx.wait_for_messages(1, timeout=5)

    mx = FakeMx("127.0.0.21", port=25); mx.start_in_thread()   # own loop in a daemon thread,
    try: ... run `mta serve` ...; mx.wait_for_messages_blocking(1, timeout=5)  # e.g. for a subprocess
    finally: mx.stop_thread()

Port 0 picks an ephemeral port (read ``mx.port`` after start); tests run as root, so 25 works too.
Transcript lists are appended on the server's loop and may be read from any thread.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from mta.testing.loop_thread import LoopThread

USER_UNKNOWN = "550 5.1.1 no such user"
MAILBOX_FULL = "452 4.2.2 mailbox full"
TOO_MANY_RECIPIENTS = "452 4.5.3 too many recipients"
STALL_SECONDS = 3600.0  # "forever": the stall ends when the client or stop() closes the connection


@dataclass
class ReceivedMessage:
    """One message the fake MX accepted (answered 2xx after the final dot)."""

    session_id: int
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    mail_options: list[str]
    tls_version: str | None
    sni: str | None
    received_at: float = field(default_factory=time.time)  # comparable with other processes' clocks

    @property
    def content(self) -> bytes:
        """The message bytes as received (the public name in mta.testing, KIT-1)."""
        return self.data


@dataclass
class MxSession:
    """What one TCP connection showed the server."""

    id: int
    peer: Any
    connected_at: float  # time.time(), comparable with other processes' clocks
    closed_at: float | None = None
    ehlo_names: list[str] = field(default_factory=list)  # EHLO and HELO arguments, in order
    commands: list[str] = field(default_factory=list)  # every command line (AUTH arguments elided)
    starttls_attempted: bool = False
    starttls: bool = False  # the TLS handshake completed
    sni: str | None = None
    tls_version: str | None = None
    tls_cipher: str | None = None
    tls_error: str | None = None
    auth_user: str | None = None
    messages: list[ReceivedMessage] = field(default_factory=list)

    @property
    def verbs(self) -> list[str]:
        return [c.split(" ", 1)[0].upper() for c in self.commands]

    def saw(self, verb: str) -> bool:
        return verb.upper() in self.verbs


class _Handler:
    """aiosmtpd hooks: capability list, per-recipient answers, message capture."""

    def __init__(self, fake: FakeMx) -> None:
        self.fake = fake

    async def handle_EHLO(self, server: _FakeSmtp, session: Session, envelope: Envelope, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname  # the 5-argument hook must do what aiosmtpd's default would
        server.record.ehlo_names.append(hostname)
        lines = [r[4:] for r in responses]
        if not self.fake.eightbitmime:
            lines = [x for x in lines if x.upper() != "8BITMIME"]
        if self.fake.pipelining:
            lines.insert(-1, "PIPELINING")
        if self.fake.broken_tls and not server.record.starttls and "STARTTLS" not in lines:
            lines.insert(-1, "STARTTLS")
        return [f"250-{x}" for x in lines[:-1]] + [f"250 {lines[-1]}"]

    async def handle_HELO(self, server: _FakeSmtp, session: Session, envelope: Envelope, hostname: str) -> str:
        session.host_name = hostname
        server.record.ehlo_names.append(hostname)
        return f"250 {self.fake.hostname}"

    async def handle_RCPT(self, server: _FakeSmtp, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        wanted = {k.lower(): v for k, v in self.fake.rcpt_replies.items()}
        reply = wanted.get(address.lower())
        if reply is not None:
            return reply
        if self.fake.max_rcpts is not None and len(envelope.rcpt_tos) >= self.fake.max_rcpts:
            return TOO_MANY_RECIPIENTS
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_exception(self, error: Exception) -> str:
        # Failed TLS handshakes land here; keep them in the transcript instead of logging tracebacks.
        self.fake.errors.append(repr(error.__cause__ or error))
        return f"500 Error: ({error.__class__.__name__}) {error}"

    async def handle_DATA(self, server: _FakeSmtp, session: Session, envelope: Envelope) -> str:
        fake = self.fake
        if fake.drop_after == "DATA_END":
            server.drop()
            await asyncio.sleep(STALL_SECONDS)  # cancelled by connection_lost
        if fake.stall_at == "DATA_END":
            await asyncio.sleep(STALL_SECONDS)
        reply = fake.replies.get("DATA_END", "250 2.0.0 OK queued")
        if reply.startswith("2"):
            rec = server.record
            msg = ReceivedMessage(session_id=rec.id, mail_from=envelope.mail_from or "",
                                  rcpt_tos=list(envelope.rcpt_tos), data=bytes(envelope.original_content or b""),
                                  mail_options=list(envelope.mail_options), tls_version=rec.tls_version, sni=rec.sni)
            rec.messages.append(msg)
            fake.messages.append(msg)
        return reply


class _FakeSmtp(SMTP):
    """aiosmtpd's SMTP with a transcript and the misbehaviours the tests ask for."""

    def __init__(self, fake: FakeMx, **kwargs: Any) -> None:
        super().__init__(_Handler(fake), **kwargs)
        self.fake = fake
        self.record = MxSession(id=-1, peer=None, connected_at=time.time())

    # --- connection lifecycle -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None:  # the TCP connection, not the TLS layer after STARTTLS
            self.record = self.fake._new_session(transport.get_extra_info("peername"))
            self.fake._live.add(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self.record.closed_at = time.time()
        self.fake._live.discard(self)
        super().connection_lost(error)

    def drop(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def _handle_client(self) -> None:
        if self.fake.stall_greeting:
            await asyncio.sleep(STALL_SECONDS)
            return
        if self.fake.greeting is not None:
            await self.push(self.fake.greeting)
            self.drop()
            return
        await super()._handle_client()

    # --- commands -------------------------------------------------------------------------
    async def _command(self, verb: str, arg: str | None, base: Callable[[str], Awaitable[None]]) -> None:
        self.record.commands.append(f"{verb} {arg}" if arg else verb)
        if self.fake.drop_after == verb:
            self.drop()
            return
        if self.fake.stall_at == verb:
            await asyncio.sleep(STALL_SECONDS)
            return
        override = self.fake.replies.get(verb)
        if override is not None:
            await self.push(override)
            return
        await base(arg)  # type: ignore[arg-type]

    async def smtp_EHLO(self, arg: str) -> None:
        await self._command("EHLO", arg, super().smtp_EHLO)

    async def smtp_HELO(self, arg: str) -> None:
        await self._command("HELO", arg, super().smtp_HELO)

    async def smtp_MAIL(self, arg: str | None) -> None:
        await self._command("MAIL", arg, super().smtp_MAIL)

    async def smtp_RCPT(self, arg: str | None) -> None:
        await self._command("RCPT", arg, super().smtp_RCPT)

    async def smtp_DATA(self, arg: str) -> None:
        await self._command("DATA", arg, super().smtp_DATA)

    async def smtp_RSET(self, arg: str) -> None:
        await self._command("RSET", arg, super().smtp_RSET)

    async def smtp_QUIT(self, arg: str) -> None:
        await self._command("QUIT", arg, super().smtp_QUIT)

    async def smtp_NOOP(self, arg: str) -> None:
        await self._command("NOOP", arg, super().smtp_NOOP)

    async def smtp_AUTH(self, arg: str) -> None:
        mechanism = (arg or "").split(" ", 1)[0]
        await self._command("AUTH", mechanism, lambda _a: super(_FakeSmtp, self).smtp_AUTH(arg))

    async def smtp_STARTTLS(self, arg: str) -> None:
        await self._command("STARTTLS", arg, self._starttls)

    async def _starttls(self, arg: str) -> None:
        self.record.starttls_attempted = True
        if self.fake.broken_tls:
            await self.push("220 2.0.0 Ready to start TLS")
            await asyncio.sleep(0.05)  # let the client begin its handshake, then answer with nonsense
            if self.transport is not None:
                self._writer.write(b"this is not a TLS record\r\n")
            self.drop()
            return
        try:
            await super().smtp_STARTTLS(arg)
        except Exception as exc:
            self.record.tls_error = repr(exc.__cause__ or exc)
            raise
        ssl_object = self.transport.get_extra_info("ssl_object") if self.transport is not None else None
        if ssl_object is not None:
            self.record.starttls = True
            self.record.tls_version = ssl_object.version()
            cipher = ssl_object.cipher()
            self.record.tls_cipher = cipher[0] if cipher else None

    def owns(self, ssl_object: Any) -> bool:
        # aiosmtpd keeps the server-side SSLProtocol; its SSLObject is what the SNI callback sees.
        return self._tls_protocol is not None and getattr(self._tls_protocol, "_sslobj", None) is ssl_object


class FakeMx:
    """A fake MX on one 127.0.0.x address; see the module docstring for knobs and transcript."""

    def __init__(self, address: str = "127.0.0.1", port: int = 0, *, hostname: str = "mx.fake.test",
                 tls_context: ssl.SSLContext | None = None, broken_tls: bool = False, greeting: str | None = None,
                 stall_greeting: bool = False, replies: dict[str, str] | None = None,
                 rcpt_replies: dict[str, str] | None = None, max_rcpts: int | None = None,
                 drop_after: str | None = None, stall_at: str | None = None, size_limit: int | None = None,
                 eightbitmime: bool = True, smtputf8: bool = False, credentials: dict[str, str] | None = None,
                 idle_timeout: float = 30.0, pipelining: bool = False) -> None:
        self.address = address
        self._port = port
        self.hostname = hostname
        self._tls_context: ssl.SSLContext | None = None
        self.tls_context = tls_context
        self.broken_tls = broken_tls
        self.greeting = greeting
        self.stall_greeting = stall_greeting
        self.replies: dict[str, str] = dict(replies or {})
        self.rcpt_replies: dict[str, str] = dict(rcpt_replies or {})
        self.max_rcpts = max_rcpts
        self.drop_after = drop_after
        self.stall_at = stall_at
        self.size_limit = size_limit
        self.eightbitmime = eightbitmime
        self.smtputf8 = smtputf8
        self.pipelining = pipelining
        self.credentials = credentials
        self.idle_timeout = idle_timeout
        self.sessions: list[MxSession] = []
        self.messages: list[ReceivedMessage] = []
        self.errors: list[str] = []  # exceptions inside the server (mostly failed TLS handshakes)
        self._live: set[_FakeSmtp] = set()
        self._server: asyncio.Server | None = None
        self._runner: LoopThread | None = None

    @property
    def tls_context(self) -> ssl.SSLContext | None:
        return self._tls_context

    @tls_context.setter
    def tls_context(self, ctx: ssl.SSLContext | None) -> None:
        if ctx is not None and ctx is not self._tls_context:
            self._hook_sni(ctx)
        self._tls_context = ctx

    # --- transcript helpers -----------------------------------------------------------------
    @property
    def port(self) -> int:
        if self._server is None:
            return self._port
        return int(self._server.sockets[0].getsockname()[1])

    def _new_session(self, peer: Any) -> MxSession:
        rec = MxSession(id=len(self.sessions), peer=peer, connected_at=time.time())
        self.sessions.append(rec)
        return rec

    def saw(self, verb: str) -> bool:
        """True if any session sent `verb` (e.g. "MAIL": STS-75/76 want it never seen)."""
        return any(s.saw(verb) for s in self.sessions)

    def clear(self) -> None:
        self.sessions.clear()
        self.messages.clear()

    async def wait_for_messages(self, n: int, timeout: float = 5.0) -> list[ReceivedMessage]:
        """Wait (bounded) until at least `n` messages arrived; raises TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while len(self.messages) < n:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{self.address}: {len(self.messages)} of {n} messages after {timeout}s")
            await asyncio.sleep(0.01)
        return list(self.messages)

    def wait_for_messages_blocking(self, n: int, timeout: float = 5.0) -> list[ReceivedMessage]:
        """The same for sync tests (the server runs in its own thread, see start_in_thread)."""
        deadline = time.monotonic() + timeout
        while len(self.messages) < n:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{self.address}: {len(self.messages)} of {n} messages after {timeout}s")
            time.sleep(0.01)
        return list(self.messages)

    async def wait_for_sessions(self, n: int, timeout: float = 5.0, *, closed: bool = False) -> list[MxSession]:
        """Wait (bounded) for `n` sessions (optionally until each is closed)."""
        deadline = time.monotonic() + timeout
        while len(self.sessions) < n or (closed and any(s.closed_at is None for s in self.sessions)):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{self.address}: {len(self.sessions)} of {n} sessions after {timeout}s")
            await asyncio.sleep(0.01)
        return list(self.sessions)

    # --- TLS ------------------------------------------------------------------------------------
    def _hook_sni(self, ctx: ssl.SSLContext) -> None:
        previous: Any = ctx.sni_callback  # typeshed says str, OpenSSL may pass None (no SNI)

        def on_sni(ssl_object: Any, server_name: str | None, context: ssl.SSLContext) -> int | None:
            # Recorded at ClientHello time, so a handshake the client aborts still shows its SNI.
            for proto in list(self._live):
                if proto.owns(ssl_object):
                    proto.record.sni = server_name
            return previous(ssl_object, server_name, context) if previous else None

        ctx.sni_callback = on_sni

    # --- lifecycle ------------------------------------------------------------------------------
    def _factory(self) -> _FakeSmtp:
        authenticator = self._authenticate if self.credentials is not None else None
        return _FakeSmtp(self, data_size_limit=self.size_limit, enable_SMTPUTF8=self.smtputf8,
                         hostname=self.hostname, ident="fake MX", tls_context=self.tls_context,
                         timeout=self.idle_timeout, authenticator=authenticator,
                         auth_require_tls=self.tls_context is not None, loop=asyncio.get_running_loop())

    def _authenticate(self, server: _FakeSmtp, session: Session, envelope: Envelope, mechanism: str,
                      auth_data: Any) -> AuthResult:
        if isinstance(auth_data, LoginPassword) and self.credentials is not None:
            user, password = auth_data.login.decode(), auth_data.password.decode()
            if self.credentials.get(user) == password:
                server.record.auth_user = user
                return AuthResult(success=True)
        return AuthResult(success=False, handled=False)

    async def start(self) -> FakeMx:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._factory, host=self.address, port=self._port)
        return self

    async def stop(self) -> None:
        if self._server is None:
            return
        self._port = self.port
        self._server.close()
        for proto in list(self._live):
            proto.drop()  # a 3.11 Server.close() leaves accepted connections open
        deadline = time.monotonic() + 2.0
        while self._live and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await self._server.wait_closed()
        self._server = None

    async def __aenter__(self) -> FakeMx:
        return await self.start()

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    def start_in_thread(self) -> FakeMx:
        """Run the server on a private loop in a daemon thread (for sync tests and subprocess relays)."""
        self._runner = LoopThread(f"fake-mx-{self.address}")
        self._runner.start(self.start)
        return self

    def stop_thread(self) -> None:
        if self._runner is not None:
            self._runner.stop(self.stop)
            self._runner = None
