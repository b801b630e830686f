"""A hand-written receiving MX that shows how replies travel (PERF-6, RFC 2920 pipelining).

aiosmtpd answers pipelined commands correctly but hides how they arrived and cannot choose how its
replies leave. ScriptedMx (an asyncio.Protocol on 127.0.0.x, the caller's loop) records every chunk
it reads (`Conversation.chunks`: one client write on loopback is one chunk) and answers all the
complete command lines of a chunk in ONE write, or byte by byte (`split="bytes"`, TCP_NODELAY:
one segment per byte), or one reply every `gap` seconds. Misbehaviour: `rcpt` per-address replies,
`mail`/`data`/`end` replies, `data_anyway` (354 even without a recipient), `close_after` (hang up
after that many replies following EHLO), `stall_at` (never answer that verb or anything after),
`huge_at` (an endless-looking 40 KB multi-line reply to that verb), `extra_after_end` (one reply
too many after the final dot), `pipelining` (advertised or not), `tls_context` (STARTTLS).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from dataclasses import dataclass, field


@dataclass
class Conversation:
    chunks: list[bytes] = field(default_factory=list)  # what each read returned, after the greeting
    commands: list[bytes] = field(default_factory=list)  # command lines (not message data)
    messages: list[tuple[list[str], bytes]] = field(default_factory=list)  # (recipients, data as received)
    replies_sent: int = 0
    closed: bool = False


class _Session(asyncio.Protocol):
    def __init__(self, mx: ScriptedMx) -> None:
        self.mx = mx
        self.conv = Conversation()
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.mail_ok = False
        self.accepted: list[str] = []
        self.in_data = False
        self.stalled = False
        self.greeted = False  # EHLO done: chunks and replies count from here
        self.tls = False
        self.out: list[bytes] = []
        self.sender: asyncio.Task[None] | None = None
        self.upgrade: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.mx.conversations.append(self.conv)
        self.mx.live.append(self)
        self.transport.write(b"220 scripted.test ESMTP\r\n")

    def connection_lost(self, exc: Exception | None) -> None:
        self.conv.closed = True

    def data_received(self, data: bytes) -> None:
        if self.greeted:
            self.conv.chunks.append(data)
        self.buffer += data
        replies: list[bytes] = []
        while not self.stalled:
            if self.in_data:
                if self.buffer.startswith(b".\r\n"):
                    body, self.buffer = b"", self.buffer[3:]
                else:
                    end = self.buffer.find(b"\r\n.\r\n")
                    if end < 0:
                        break
                    body, self.buffer = self.buffer[:end + 2], self.buffer[end + 5:]
                self.in_data = False
                self.conv.messages.append((list(self.accepted), body))
                self.mail_ok, self.accepted = False, []
                replies.append(self._reply("END", self.mx.end))
                if self.mx.extra_after_end:
                    replies.append(b"250 2.0.0 and one more\r\n")
                continue
            line, sep, rest = self.buffer.partition(b"\r\n")
            if not sep:
                break
            self.buffer = rest
            self.conv.commands.append(line)
            if line.upper().startswith((b"EHLO", b"HELO", b"STARTTLS")):
                self.transport.write(self._hello(line))  # type: ignore[union-attr]  (never counted or split)
                if line.upper() == b"STARTTLS":
                    self.upgrade = asyncio.ensure_future(self._starttls())
                    return
                continue
            reply = self._command(line)
            if reply:
                replies.append(reply)
        self._send(replies)

    def _hello(self, line: bytes) -> bytes:
        if line.upper() == b"STARTTLS":
            return b"220 2.0.0 go ahead\r\n"
        self.greeted = True
        caps = ["scripted.test", "8BITMIME", "SIZE 1000000"]
        if self.mx.pipelining:
            caps.append("PIPELINING")
        if self.mx.tls_context is not None and not self.tls:
            caps.append("STARTTLS")
        return "".join(f"250{'-' if i < len(caps) - 1 else ' '}{c}\r\n" for i, c in enumerate(caps)).encode()

    def _command(self, line: bytes) -> bytes:
        verb = line.split(b" ", 1)[0].split(b":", 1)[0].upper().decode()
        if self.mx.stall_at == verb:
            self.stalled = True
            return b""
        if verb == "MAIL":
            self.mail_ok = self.mx.mail.startswith("2")
            self.accepted = []
            return self._reply(verb, self.mx.mail)
        if verb == "RCPT":
            if not self.mail_ok:
                return self._reply(verb, "503 5.5.1 need MAIL")
            address = line.split(b"<", 1)[1].split(b">", 1)[0].decode()
            reply = self.mx.rcpt.get(address, "250 2.1.5 ok")
            if reply.startswith("2"):
                self.accepted.append(address)
            return self._reply(verb, reply)
        if verb == "DATA":
            if self.accepted or (self.mx.data_anyway and self.mail_ok):
                self.in_data = self.mx.data.startswith("354")
                return self._reply(verb, self.mx.data)
            return self._reply(verb, "503 5.5.1 no valid recipients" if self.mail_ok else "503 5.5.1 need MAIL")
        if verb == "RSET":
            self.mail_ok, self.accepted = False, []
        if verb == "QUIT":
            return b"221 2.0.0 bye\r\n"
        return self._reply(verb, "250 2.0.0 ok")

    def _reply(self, verb: str, text: str) -> bytes:
        if self.mx.huge_at == verb:
            return b"".join(b"250-" + b"z" * 1000 + b"\r\n" for _ in range(40)) + b"250 done\r\n"
        return text.encode() + b"\r\n"

    def _send(self, replies: list[bytes]) -> None:
        if not replies or self.transport is None:
            return
        if self.mx.close_after is not None and self.conv.replies_sent + len(replies) > self.mx.close_after:
            replies = replies[:max(self.mx.close_after - self.conv.replies_sent, 0)]
            self.conv.replies_sent += len(replies)
            self.transport.write(b"".join(replies))
            self.transport.close()
            return
        self.conv.replies_sent += len(replies)
        self._write(replies)

    def _write(self, replies: list[bytes]) -> None:
        assert self.transport is not None
        if self.mx.split == "one" and not self.mx.gap:
            self.transport.write(b"".join(replies))
            return
        self.out.extend(replies)
        if self.sender is None or self.sender.done():
            self.sender = asyncio.ensure_future(self._trickle())

    async def _trickle(self) -> None:
        while self.out and self.transport is not None and not self.transport.is_closing():
            reply = self.out.pop(0)
            if self.mx.gap:
                await asyncio.sleep(self.mx.gap)
            if self.mx.split != "bytes":
                self.transport.write(reply)
                continue
            for i in range(len(reply)):
                self.transport.write(reply[i:i + 1])
                await asyncio.sleep(0.001)

    async def _starttls(self) -> None:
        assert self.transport is not None and self.mx.tls_context is not None
        loop = asyncio.get_running_loop()
        self.transport = await loop.start_tls(self.transport, self, self.mx.tls_context, server_side=True)
        self.tls = True
        self.greeted = False


@dataclass
class ScriptedMx:
    address: str
    pipelining: bool = True
    split: str = "one"  # "one": all replies to a chunk in one write; "bytes": one byte per segment
    gap: float = 0.0  # seconds before each reply (then written one by one)
    mail: str = "250 2.1.0 ok"
    rcpt: dict[str, str] = field(default_factory=dict)
    data: str = "354 go ahead"
    end: str = "250 2.0.0 queued"
    data_anyway: bool = False
    close_after: int | None = None
    stall_at: str | None = None
    huge_at: str | None = None
    extra_after_end: bool = False
    tls_context: ssl.SSLContext | None = None
    conversations: list[Conversation] = field(default_factory=list)
    live: list[_Session] = field(default_factory=list)
    _server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def __aenter__(self) -> ScriptedMx:
        self._server = await asyncio.get_running_loop().create_server(lambda: _Session(self), self.address, 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for session in self.live:
            if session.transport is not None:
                session.transport.close()  # a 3.11 Server.close() leaves accepted connections open
