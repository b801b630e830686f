"""Submission listeners: aiosmtpd SMTP protocols on our own event loop (not the threaded Controller).

Adds what aiosmtpd leaves to us, each with bounded time and memory against hostile clients:
- a connection cap (421 beyond it) and a listen backlog large enough that a burst gets that 421
  promptly instead of stalling in the kernel queue; a cap per client address (Postfix anvil's
  default of 50), and above STRESS_SHARE of the cap every idle timer is cut to
  stress_idle_timeout (Postfix's stress mode), so one address, or a few, cannot lock out the
  others (issue 10 item 14);
- AUTH brute force slowed per client address: attempts from one address run one at a time, each
  after a delay growing with the earlier failures (so parallel connections do not dodge it);
- DATA read with bounded memory: aiosmtpd 1.4.6 keeps every fragment of an over-long line (one
  endless line, or bare-LF "lines") until a CRLF arrives, so 30 MB without CRLF cost 30 MB; ours
  drops fragments and keeps at most max_message_size (tests/integration/test_library_gaps.py);
- aiosmtpd's own log lines carry raw client text (every command line, an unrecognised "command"
  that may be a base64 password sent after a refused AUTH): that text is redacted;
- implicit-TLS listeners whose handshake must finish within idle_timeout.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from email._header_value_parser import get_addr_spec, get_angle_addr
from email.errors import HeaderParseError
from typing import Any

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, _AuthMechAttr, syntax

from mta import metrics
from mta.config import Config, SubmissionConfig, parse_hostport
from mta.dkim.signer import Signer
from mta.spool.state import MessageMeta
from mta.spool.store import SpoolStore
from mta.submission.auth import load_users
from mta.submission.caps import ConnectionCounts, LocalCounts, SharedCounts
from mta.submission.handler import PendingCheck, SubmissionHandler, hook_names

_BACKLOG = 1024  # asyncio's default 100 lets a burst of connects sit in SYN_RECV for seconds
_AUTH_DELAY_STEPS = 8  # the delay stops growing after this many failures
_TRACKED_PEERS = 10000  # memory bound of the failure table
# DATA is read in blocks of up to this many octets (a block ends at `.` CRLF); the stream reader's
# limit, so also what a command line may buffer before aiosmtpd calls it too long (it then checks
# the RFC 5321 command length itself). Lines of data keep RFC 5321's 1000 octets (SMTP-27).
READ_LIMIT = 16 * 1024
DATA_LINE_LIMIT = 1001  # with its CRLF, as aiosmtpd counts
STRESS_SHARE = 0.8  # above this share of max_connections in use, idle clients get the short timeout
# The common MAIL/RCPT argument, `<dot-atom@dot-atom>` and maybe parameters (RFC 5321 §4.1.2),
# for which the email package's parser (what aiosmtpd uses) returns the text between the angle
# brackets unchanged and the rest of the line after the blanks; anything else (comments, quoted
# strings, domain literals, non-ASCII) goes to that parser.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_SIMPLE_PATH = re.compile(rf"[ \t]*<({_ATEXT}(?:\.{_ATEXT})*@{_ATEXT}(?:\.{_ATEXT})*)>[ \t]*(?![\s(])")



class _RedactClientText(logging.Filter):
    """aiosmtpd ("mail.log") logs client bytes; keep the record, drop the client's text."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and args:
            record.args = tuple(f"<{len(a)} octets redacted>" if isinstance(a, str | bytes | bytearray) else a
                                for a in args)
        return True


def install_log_redaction() -> None:
    """Idempotent: adds the redacting filter to aiosmtpd's logger once per process."""
    logger = logging.getLogger("mail.log")
    if not any(isinstance(f, _RedactClientText) for f in logger.filters):
        logger.addFilter(_RedactClientText())


class _Limits:
    """State shared by every connection of one relay process."""

    def __init__(self, max_connections: int, auth_delay: float, *, per_client: int | None = None,
                 idle_timeout: float = 300.0, stress_idle_timeout: float = 10.0,
                 shared: SharedCounts | None = None) -> None:
        # `shared`: the counts of every listener process of the relay, when there are several
        # (mta.submission.caps): the caps then bound the relay, not this process.
        self.counts: ConnectionCounts = shared if shared is not None else LocalCounts()
        self.max_connections = max_connections
        self.per_client = per_client or max_connections
        self.idle_timeout = idle_timeout
        self.stress_idle_timeout = min(stress_idle_timeout, idle_timeout)
        self._stress_seen = False
        self.connections: set[RelaySMTP] = set()
        self.auth_delay = auth_delay
        self.auth_failures: dict[str, int] = {}
        self.auth_locks: dict[str, asyncio.Lock] = {}

    @property
    def active(self) -> int:
        """This process's open connections."""
        return self.counts.own()

    @property
    def stressed(self) -> bool:
        return self.counts.total() > STRESS_SHARE * self.max_connections

    def admit(self, conn: RelaySMTP, client: str) -> str | None:
        """Count a new connection in; the 421 line when it is over a cap."""
        if self.counts.of_client(client) >= self.per_client:
            return "421 4.7.0 Too many connections from your address, try again later"
        if self.counts.total() >= self.max_connections:
            return "421 4.7.0 Too many connections, try again later"
        # Stress is the relay's (the shared total) but each process shortens its own idle timers:
        # on its first admit under stress, wherever the total crossed the line (PERF-5).
        was_stressed = self._stress_seen and self.stressed
        self.counts.add(client, 1)
        self.connections.add(conn)
        self._stress_seen = self.stressed
        if self._stress_seen and not was_stressed:
            for other in self.connections:  # stress begins: idle clients get the short timer now
                other.shorten_idle_timer(self.stress_idle_timeout)
        return None

    def release(self, conn: RelaySMTP, client: str) -> None:
        self.counts.add(client, -1)
        self.connections.discard(conn)

    def auth_lock(self, peer: str) -> asyncio.Lock:
        if len(self.auth_locks) > _TRACKED_PEERS:
            for key in [k for k, lock in self.auth_locks.items() if not lock.locked()]:
                del self.auth_locks[key]
        return self.auth_locks.setdefault(peer, asyncio.Lock())

    def note_auth(self, peer: str, ok: bool) -> None:
        if ok:
            self.auth_failures.pop(peer, None)
            return
        if len(self.auth_failures) > _TRACKED_PEERS:
            self.auth_failures.clear()
        # Read-modify-write with no await in between: concurrent failures all count.
        self.auth_failures[peer] = self.auth_failures.get(peer, 0) + 1


class RelaySMTP(SMTP):
    """aiosmtpd's SMTP with a connection cap, AUTH failure delays and a memory-bounded DATA."""

    line_length_limit = READ_LIMIT  # aiosmtpd's name for the stream reader's limit (see READ_LIMIT)

    def __init__(self, handler: SubmissionHandler, limits: _Limits, listener: str = "smtp", **kwargs: Any) -> None:
        cache: dict[tuple[type, tuple[str, ...]], _Hooks] = handler.__dict__.setdefault("_hooks_found", {})
        key = (type(self), tuple(name for name in vars(handler) if name.startswith(("handle_", "auth_"))))
        found = cache.get(key)
        if found is None:
            super().__init__(handler, **kwargs)
            cache[key] = _Hooks.of(self)
        else:
            # aiosmtpd finds its smtp_*/auth_*/handle_* names by introspection in __init__, on every
            # connection (a tenth of the listener's CPU for a message on its own connection). They
            # depend only on the class and the handler, so after the first connection __init__
            # runs with nothing to find (`_bare`) and the names found the first time are bound here.
            self._bare = True
            handler._bare = True
            try:
                super().__init__(handler, **kwargs)
            finally:
                self._bare = False
                handler._bare = False
            found.bind(self)
        self._limits = limits
        self._counted = False
        self._client = ""
        self.listener = listener  # metrics label: "smtp:PORT" or "smtps:PORT", never a client's text

    # aiosmtpd's SMTP.__init__ finds the smtp_*/auth_* methods and the handler's hooks with dir() and
    # inspect.getmembers() on every new connection, which reads all ~130 attributes of the protocol
    # (about 0.1 ms, a tenth of the CPU of a message that comes on its own connection). It only
    # looks for names with these prefixes, so dir() lists just those (computed once per class).
    def __dir__(self) -> list[str]:
        return [] if self._bare else hook_names(self, ("smtp_", "auth_", "handle_"))

    _bare = False

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's MAIL/RCPT address parser (same results), without its per-call cost.

        aiosmtpd 1.4.6 defines a typing.Protocol class on every call (about 30 µs) before it runs
        the email package's parser; a plain `<local@domain>` path is taken apart here directly.
        """
        if not arg:
            return "", ""
        m = _SIMPLE_PATH.match(arg)
        if m is not None:
            address, rest = m.group(1), arg[m.end():]
        else:
            try:
                token, rest = get_angle_addr(arg) if arg.lstrip().startswith("<") else get_addr_spec(arg)
            except HeaderParseError:
                return None, None
            address = token.addr_spec
        if self.local_part_limit and len(address.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return address, rest

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._original_transport is None and not self._counted:
            peer = transport.get_extra_info("peername")
            self._client = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
            refusal = self._limits.admit(self, self._client)
            if refusal is not None:
                transport.write(refusal.encode() + b"\r\n")  # type: ignore[attr-defined]
                metrics.message_rejected("421")
                transport.close()
                self.transport = None
                return
            self._counted = True
            metrics.connection_opened(self.listener)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self._counted:
            self._limits.release(self, self._client)
            self._counted = False
            metrics.connection_closed(self.listener)
        if self.session is None:
            return
        super().connection_lost(error)

    # aiosmtpd has no public way to change a running connection's idle timeout: its private
    # _reset_timeout is the one place the timer is armed (at connect and after each command), so
    # the stress-mode timeout is applied there (issue 10 item 14).
    def _reset_timeout(self, duration: float | None = None) -> None:
        if duration is None and self._limits.stressed:
            duration = self._limits.stress_idle_timeout
        super()._reset_timeout(duration)

    def shorten_idle_timer(self, seconds: float) -> None:
        """Fire the idle timer within `seconds` from now, unless it fires sooner already."""
        handle = self._timeout_handle
        if self.transport is None or handle is None or handle.cancelled():
            return
        if handle.when() - self.loop.time() > seconds:
            super()._reset_timeout(seconds)

    def eof_received(self) -> bool | None:
        # aiosmtpd cancels the session on EOF but (plain TCP) asks to keep the socket half-open,
        # and nothing closes it until the idle timer: a client that connects and hangs up would
        # hold a connection slot (and mta_smtp_connections) for idle_timeout. Close it now.
        super().eof_received()
        return False

    async def smtp_AUTH(self, arg: str) -> None:
        peer = self.session.peer[0] if self.session and isinstance(self.session.peer, tuple) else "?"
        # One attempt at a time per address, so N parallel connections wait N delays, not one.
        # Waiting here is bounded by the idle timer, which keeps running (it closes the connection).
        async with self._limits.auth_lock(peer):
            failures = self._limits.auth_failures.get(peer, 0)
            if failures:
                # Each earlier failure from this address costs another delay step (capped).
                await asyncio.sleep(self._limits.auth_delay * min(failures, _AUTH_DELAY_STEPS))
            if self.transport is None:
                return
            await super().smtp_AUTH(arg)
            self._limits.note_auth(peer, self.session is not None and bool(self.session.authenticated))

    # Issue 10 item 8: aiosmtpd calls the authenticator synchronously, so ours only returns a
    # PendingCheck and the password check (scrypt) runs here, awaited, in the handler's thread pool.
    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        return await self._complete(await super().auth_PLAIN(_, args))

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        return await self._complete(await super().auth_LOGIN(_, args))

    async def _complete(self, result: AuthResult) -> AuthResult:
        if isinstance(result, AuthResult) and isinstance(result.auth_data, PendingCheck):
            assert self.session is not None
            return await self.event_handler.check_credentials(self.session, result.auth_data.credentials)
        return result

    async def _call_handler_hook(self, command: str, *args: Any) -> Any:
        status = await super()._call_handler_hook(command, *args)
        if command in ("MAIL", "RCPT", "DATA") and isinstance(status, str) and status[:1] in ("4", "5"):
            metrics.message_rejected(status)  # our own refusals only (relay denied, disk full, ...)
        return status

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA, same replies and end-of-data rule, but memory bounded by max_message_size.

        Lines end at CRLF only and `.` CRLF ends the data only at the start of a line (RFC 5321
        §4.1.1.4), so bare LF / CR can never make an end of data (SMTP-26, no smuggling). A line over
        1000 octets (SMTP-27) or a message over the limit is read to its end and then refused; the
        size refusal wins when both apply, being the one the client can act on.
        """
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        limit = self.data_size_limit or 0
        content, size, too_long = await self._read_data(limit)
        if limit and size > limit:
            status: Any = "552 5.3.4 Message size exceeds fixed maximum message size"
            metrics.message_rejected(status)
        elif too_long:
            status = "500 5.5.2 Line too long (see RFC 5321 4.5.3.1.6)"
            metrics.message_rejected(status)
        else:
            self.envelope.content = content
            self.envelope.original_content = content
            status = await self._call_handler_hook("DATA")
            status = "250 OK" if status is MISSING else status
        self._set_post_data_state()
        await self.push(status)

    async def _read_data(self, limit: int) -> tuple[bytes, int, bool]:
        """The data up to `.` CRLF at a line start, dot-unstuffed; its size; whether a line was too long.

        Read in blocks that end at `.` CRLF (the reader's limit is READ_LIMIT, not a line), not a
        line at a time: one await per block instead of one per line (issue 18). The rules are a
        line's: a line ends at CRLF only, the data ends at `.` CRLF only at a line start, a line
        over DATA_LINE_LIMIT octets with its CRLF is too long (SMTP-27), and once the size passes
        `limit` nothing more is kept (the reply is a refusal anyway).
        """
        kept: list[bytes] = []
        size = 0  # octets before the terminator, as the client sent them
        tail = b""  # the last two octets read before the current block
        end = False
        while not end:
            try:
                block = await self._reader.readuntil(b".\r\n")
            except asyncio.LimitOverrunError as exc:
                block = await self._reader.read(exc.consumed)  # no `.` CRLF within READ_LIMIT
            else:
                before = block[:-3]
                end = (tail + before)[-2:] == b"\r\n" or (size == 0 and not before)
                if end:
                    block = before  # `.` CRLF at a line start: the end of the data
            size += len(block)
            tail = (tail + block)[-2:]
            if limit and size > limit:
                kept.clear()  # refused anyway: hold nothing more
            else:
                kept.append(block)
        if limit and size > limit:
            return b"", size, False
        data = b"".join(kept)
        # Every line but the last has its CRLF; the last is empty for a well-formed message (a
        # last line without CRLF before the terminator cannot exist: the terminator starts one).
        if max(map(len, data.split(b"\r\n"))) + 2 > DATA_LINE_LIMIT:
            return b"", size, True
        if data.startswith(b"."):  # §4.5.2 transparency: one leading dot off every line
            data = data[1:]
        return data.replace(b"\r\n.", b"\r\n"), size, False


@dataclass(frozen=True)
class _Hooks:
    """What aiosmtpd's SMTP.__init__ found for one protocol class and handler, by name."""

    smtp: tuple[tuple[str, str], ...]  # (command, method name) of the protocol
    auth: tuple[tuple[str, str, bool], ...]  # (mechanism, method name, on the protocol itself)
    handle: dict[str, Callable[..., Any]]  # the handler's hooks, already bound to it
    ehlo_version: str | None

    @classmethod
    def of(cls, proto: SMTP) -> _Hooks:
        smtp = tuple((cmd, meth.__name__) for cmd, meth in proto._smtp_methods.items())
        auth = tuple((mech, attr.method.__name__, attr.is_builtin) for mech, attr in proto._auth_methods.items())
        return cls(smtp, auth, dict(proto._handle_hooks), proto._ehlo_hook_ver)

    def bind(self, proto: SMTP) -> None:
        handler = proto.event_handler
        proto._smtp_methods = {cmd: getattr(proto, name) for cmd, name in self.smtp}
        proto._auth_methods = {mech: _AuthMechAttr(getattr(proto if builtin else handler, name), builtin)
                               for mech, name, builtin in self.auth}
        proto._handle_hooks = dict(self.handle)
        proto._ehlo_hook_ver = self.ehlo_version


def server_tls_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def listener_name(implicit_tls: bool, port: int) -> str:
    """The `listener` label of a socket: its kind and configured port (a small fixed set)."""
    return f"{'smtps' if implicit_tls else 'smtp'}:{port}"


def build_listeners(cfg: Config, store: SpoolStore, on_accept: Callable[[MessageMeta], None],
                    shared: SharedCounts | None = None) -> Listeners:
    """The submission listeners of `cfg`, spooling into `store` and reporting each accepted message;
    `shared`: the connection counts of every listener process (mta.submission.caps)."""
    users = load_users(cfg.submission.users_file) if cfg.submission.users_file else {}
    signer = Signer.from_config(cfg) if cfg.dkim.enabled else None
    handler = SubmissionHandler(cfg.submission, cfg.hostname, store, on_accept, users, signer)
    return Listeners(cfg.submission, cfg.hostname, handler, shared)


class Listeners:
    """Starts and stops every submission socket of one process."""

    def __init__(self, cfg: SubmissionConfig, hostname: str, handler: SubmissionHandler,
                 shared: SharedCounts | None = None) -> None:
        self.cfg = cfg
        self.hostname = hostname
        self.handler = handler
        self.limits = _Limits(cfg.max_connections, cfg.auth_failure_delay, per_client=cfg.max_connections_per_client,
                              idle_timeout=cfg.idle_timeout, stress_idle_timeout=cfg.stress_idle_timeout,
                              shared=shared)
        install_log_redaction()
        self.tls_context = server_tls_context(cfg.tls_cert, cfg.tls_key) if cfg.tls_cert else None
        self.servers: list[asyncio.Server] = []

    def protocol(self, cls: type[RelaySMTP] | None = None) -> SMTP:
        """One plain SMTP protocol object with this listener's limits (`sendmail -bs` runs one on stdio)."""
        return self._factory(False, "sendmail", cls)

    def _factory(self, implicit_tls: bool, name: str, cls: type[RelaySMTP] | None = None) -> SMTP:
        return (cls or RelaySMTP)(
            self.handler,
            self.limits,
            name,
            hostname=self.hostname,
            ident="mta",
            data_size_limit=self.cfg.max_message_size,
            enable_SMTPUTF8=True,
            tls_context=None if implicit_tls else self.tls_context,
            timeout=self.cfg.idle_timeout,
            auth_require_tls=not self.cfg.allow_insecure_auth and not implicit_tls,
            authenticator=self.handler.authenticator,
        )

    async def start(self, socks: list[socket.socket] | None = None) -> None:
        """Listen on every configured address; `socks` (one per address, in this order) are already
        bound and listening (several processes on one port, mta.submission.sockets)."""
        loop = asyncio.get_running_loop()
        given = iter(socks or ())
        for implicit, addrs in ((False, self.cfg.listen), (True, self.cfg.implicit_tls_listen)):
            for item in addrs:
                host, port = parse_hostport(item)
                name = listener_name(implicit, port)
                sock = next(given, None)
                where: dict[str, Any] = {"sock": sock} if sock is not None else \
                    {"host": host, "port": port, "reuse_address": True}
                server = await loop.create_server(
                    lambda implicit=implicit, name=name: self._factory(implicit, name),  # type: ignore[misc]
                    ssl=self.tls_context if implicit else None, backlog=_BACKLOG, **where,
                    # The SMTP idle timer starts only after the handshake: bound the handshake too.
                    ssl_handshake_timeout=self.cfg.idle_timeout if implicit else None,
                )
                self.servers.append(server)

    def addresses(self) -> list[tuple[str, int]]:
        out = []
        for server in self.servers:
            for sock in server.sockets:
                name = sock.getsockname()
                out.append((name[0], name[1]))
        return out

    async def stop(self) -> None:
        for server in self.servers:
            server.close()
        for server in self.servers:
            await server.wait_closed()
        self.servers.clear()
