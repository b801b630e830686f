"""In-process submission listeners and a byte-level SMTP client for the submission tests."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from mta import config
from mta.spool.state import MessageMeta
from mta.spool.store import SpoolStore
from mta.submission.auth import load_users
from mta.submission.handler import SubmissionHandler
from mta.submission.listener import Listeners


class Server:
    """A running listener: its spool, the messages it accepted and where it listens."""

    def __init__(self, store: SpoolStore, listeners: Listeners, accepted: list[MessageMeta]) -> None:
        self.store, self.listeners, self.accepted = store, listeners, accepted
        self.host, self.port = listeners.addresses()[0]


async def start_server(spool: Path, base: Path, **submission: Any) -> Server:
    """Start a listener on our loop with `[submission]` settings; stop it with `server.listeners.stop()`."""
    cfg = config.from_dict({"submission": submission}, base=base)
    store = SpoolStore(spool)
    store.prepare()
    accepted: list[MessageMeta] = []
    users = load_users(cfg.submission.users_file) if cfg.submission.users_file else None
    handler = SubmissionHandler(cfg.submission, "relay.test", store, accepted.append, users)
    listeners = Listeners(cfg.submission, "relay.test", handler)
    await listeners.start()
    return Server(store, listeners, accepted)


class RawClient:
    """A byte-level SMTP client: we need to send what no well-behaved library would."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, host: str, port: int, *, source: str | None = None, greet: bool = True) -> RawClient:
        local = (source, 0) if source else None
        raw = cls(*await asyncio.open_connection(host, port, local_addr=local))
        if greet:
            assert (await raw.reply()).startswith(b"220")
        return raw

    async def reply(self, timeout: float = 5) -> bytes:
        """One complete (possibly multi-line) reply; b"" when the server closed."""
        lines = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), timeout)
            if not line:
                return b"".join(lines)
            lines.append(line)
            if line[3:4] != b"-":
                return b"".join(lines)

    async def send(self, data: bytes, timeout: float = 5) -> bytes:
        """Write `data` as is (no CRLF added) and read one reply."""
        self.writer.write(data)
        await self.writer.drain()
        return await self.reply(timeout)

    async def closed_within(self, seconds: float) -> bool:
        """True when the server closes the connection within `seconds` (bytes read are dropped)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                chunk = await asyncio.wait_for(self.reader.read(65536), left)
            except TimeoutError:
                return False
            except ConnectionError:
                return True
            if not chunk:
                return True
        return False

    def close(self) -> None:
        self.writer.close()
