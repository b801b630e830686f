"""Submission listeners: aiosmtpd SMTP protocols on our own event loop (not the threaded Controller).

Adds what aiosmtpd leaves to us: a connection cap (421 beyond it), a growing delay after failed
AUTH attempts from one address (brute force is slowed and logged), and implicit-TLS listeners.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

from aiosmtpd.smtp import SMTP

from mta.config import SubmissionConfig, parse_hostport
from mta.submission.handler import SubmissionHandler


class _Limits:
    """State shared by every connection of one relay process."""

    def __init__(self, max_connections: int, auth_delay: float) -> None:
        self.max_connections = max_connections
        self.active = 0
        self.auth_delay = auth_delay
        self.auth_failures: dict[str, int] = {}


class RelaySMTP(SMTP):
    """aiosmtpd's SMTP with a connection cap and AUTH failure delays."""

    def __init__(self, handler: SubmissionHandler, limits: _Limits, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._limits = limits
        self._counted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._original_transport is None and not self._counted:
            if self._limits.active >= self._limits.max_connections:
                transport.write(b"421 4.7.0 Too many connections, try again later\r\n")  # type: ignore[attr-defined]
                transport.close()
                self.transport = None
                return
            self._limits.active += 1
            self._counted = True
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self._counted:
            self._limits.active -= 1
            self._counted = False
        if self.session is None:
            return
        super().connection_lost(error)

    async def smtp_AUTH(self, arg: str) -> None:
        peer = self.session.peer[0] if self.session and isinstance(self.session.peer, tuple) else "?"
        failures = self._limits.auth_failures.get(peer, 0)
        if failures:
            # Each earlier failure from this address costs another delay step (capped).
            await asyncio.sleep(self._limits.auth_delay * min(failures, 8))
        await super().smtp_AUTH(arg)
        if self.session is not None and not self.session.authenticated:
            self._limits.auth_failures[peer] = failures + 1
            if len(self._limits.auth_failures) > 10000:
                self._limits.auth_failures.clear()
        else:
            self._limits.auth_failures.pop(peer, None)


def server_tls_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


class Listeners:
    """Starts and stops every submission socket of one process."""

    def __init__(self, cfg: SubmissionConfig, hostname: str, handler: SubmissionHandler) -> None:
        self.cfg = cfg
        self.hostname = hostname
        self.handler = handler
        self.limits = _Limits(cfg.max_connections, cfg.auth_failure_delay)
        self.tls_context = server_tls_context(cfg.tls_cert, cfg.tls_key) if cfg.tls_cert else None
        self.servers: list[asyncio.Server] = []

    def _factory(self, implicit_tls: bool) -> SMTP:
        return RelaySMTP(
            self.handler,
            self.limits,
            hostname=self.hostname,
            ident="mta",
            data_size_limit=self.cfg.max_message_size,
            enable_SMTPUTF8=True,
            tls_context=None if implicit_tls else self.tls_context,
            timeout=self.cfg.idle_timeout,
            auth_require_tls=not self.cfg.allow_insecure_auth and not implicit_tls,
            authenticator=self.handler.authenticator,
        )

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for implicit, addrs in ((False, self.cfg.listen), (True, self.cfg.implicit_tls_listen)):
            for item in addrs:
                host, port = parse_hostport(item)
                server = await loop.create_server(
                    lambda implicit=implicit: self._factory(implicit),  # type: ignore[misc]
                    host=host, port=port, ssl=self.tls_context if implicit else None,
                    reuse_address=True,
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
