"""Idle SMTP connections kept for reuse while fresh.

A session is reused only for the same destination (MX host, address, port) AND the same TLS
requirement, so a connection opened opportunistically can never serve an enforce delivery.
A session whose last transaction ended cleanly (reply to the end of data, refused MAIL) goes
straight to the next MAIL, as Postfix's cached sessions do; any other gets an RSET first. A
connection the server closed while it sat here is seen as closed and dropped; one it closes at the
very moment we reuse it fails at MAIL with nothing sent, and the caller takes a new connection
(mta.delivery.attempt).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

from mta.delivery.smtp_client import SmtpSession

Key = tuple[str, str, int, Any]


class ConnectionPool:
    def __init__(self, max_idle_time: float, max_per_key: int = 8,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_idle_time = max_idle_time
        self.max_per_key = max_per_key
        self.clock = clock
        self._idle: dict[Key, list[SmtpSession]] = {}
        self.reused = 0

    async def get(self, key: Key) -> SmtpSession | None:
        """A fresh idle session for `key` with no transaction open (RSET where needed), or None."""
        sessions = self._idle.get(key)
        while sessions:
            session = sessions.pop()
            if self.clock() - session.last_used > self.max_idle_time:
                await self.discard(session)
                continue
            if session.idle and session.usable:
                self.reused += 1
                return session
            if await session.reset():
                self.reused += 1
                return session
            await self.discard(session)
        return None

    async def put(self, key: Key, session: SmtpSession) -> None:
        if self.max_idle_time <= 0:
            await self.discard(session)
            return
        sessions = self._idle.setdefault(key, [])
        if len(sessions) >= self.max_per_key:
            await self.discard(session)
            return
        sessions.append(session)

    async def sweep(self) -> None:
        """Close sessions idle for longer than max_idle_time.

        The idle lists are settled before the first await: closing a session yields to workers
        that take and return sessions, and a list rebuilt from an older view would put a session
        in use back into the pool (two transactions on one connection) or drop a returned one.
        """
        now = self.clock()
        stale: list[SmtpSession] = []
        for key, sessions in list(self._idle.items()):
            keep = [s for s in sessions if now - s.last_used <= self.max_idle_time]
            stale.extend(s for s in sessions if now - s.last_used > self.max_idle_time)
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
        for s in stale:
            await self.discard(s)

    async def close_all(self) -> None:
        idle = [s for sessions in self._idle.values() for s in sessions]
        self._idle.clear()
        for s in idle:
            await self.discard(s)

    @staticmethod
    async def discard(session: SmtpSession) -> None:
        """Close a session that must not be reused (best effort)."""
        with contextlib.suppress(Exception):
            await session.close()
