"""Reading the replies of one SMTP transaction in order, pipelined or not (RFC 2920, PERF-6).

aiosmtplib's SMTPProtocol reads one reply per command it wrote itself: data arriving while a parsed
reply awaits pickup is dropped, and a second reply already in its buffer is never parsed
(tests/integration/test_library_gaps.py). So for the length of a transaction `ReplyReader` takes
the connection's place as the transport's protocol (`transport.set_protocol`, which works the same
on a TLS transport) and gives it back afterwards; the library is never patched. Everything a
transport reports besides data - pause/resume writing, EOF, the connection lost - is passed on to
aiosmtplib's protocol as well, so its flow control (`_drain_helper`) and its view of the
connection stay right.

Bounds as aiosmtplib's: a line at most 8192 bytes, a reply at most 32 KiB (an endless multi-line
reply fails at once). A reply code must be three digits. More replies than commands written, or a
malformed line, fail the reader: the replies already complete are still handed out in order, then
every read raises `SMTPResponseException(-1, ...)` - aiosmtplib's "invalid response" - and
`detach` reports the connection out of step, so it is never reused. A lost connection or EOF
raises `SMTPServerDisconnected`, a reply not there in time `SMTPReadTimeoutError` (SMTP-31: each
read has its own timeout). After a 421 (the server is closing, RFC 5321 §3.8) the connection is
closed and later reads raise `SMTPServerDisconnected`, as aiosmtplib does.
"""

from __future__ import annotations

import asyncio
from collections import deque

from aiosmtplib import SMTPReadTimeoutError, SMTPResponseException, SMTPServerDisconnected
from aiosmtplib.protocol import MAX_LINE_LENGTH, MAX_RESPONSE_LENGTH, SMTPProtocol
from aiosmtplib.response import SMTPResponse

INVALID = -1  # aiosmtplib's code for a reply outside the protocol (SMTPStatus.invalid_response)


class ReplyReader(asyncio.Protocol):
    """Replies to the commands of one transaction; see the module docstring."""

    def __init__(self, inner: SMTPProtocol, transport: asyncio.Transport) -> None:
        self._inner = inner
        self._transport = transport
        self._loop = asyncio.get_running_loop()
        self._buffer = bytearray()
        self._scanned = 0  # bytes of the buffer's partial reply already checked (whole lines)
        self._replies: deque[SMTPResponse] = deque()
        self._owed = 0  # replies due for the commands written and not yet handed out
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    @classmethod
    def attach(cls, inner: SMTPProtocol | None) -> ReplyReader:
        """Take over the connection of aiosmtplib's protocol; SMTPServerDisconnected if it is gone."""
        transport = inner.transport if inner is not None else None
        if inner is None or transport is None or transport.is_closing():
            raise SMTPServerDisconnected("Connection lost")
        reader = cls(inner, transport)  # type: ignore[arg-type]
        transport.set_protocol(reader)
        return reader

    def detach(self) -> bool:
        """Give the connection back to aiosmtplib; False if it is out of step and must be dropped."""
        self._transport.set_protocol(self._inner)
        return not (self._error or self._buffer or self._replies or self._owed)

    # --- writing ----------------------------------------------------------------------------------
    def send(self, data: bytes, replies: int) -> None:
        """Write `data` (one command or several, or a block of the message) owing `replies` replies."""
        if self._transport.is_closing():
            raise SMTPServerDisconnected("Connection lost")
        self._owed += replies
        self._transport.write(data)

    async def drain(self, timeout: float) -> None:
        """Wait while the transport's buffer is full (StreamWriter.drain's wait, via aiosmtplib's protocol)."""
        await asyncio.wait_for(self._inner._drain_helper(), timeout)

    # --- reading ----------------------------------------------------------------------------------
    async def reply(self, timeout: float) -> SMTPResponse:
        """The next reply in order, within `timeout` seconds."""
        if not self._replies and self._error is None:
            waiter = self._waiter = self._loop.create_future()
            timer = self._loop.call_later(timeout, _expire, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
        if not self._replies:
            assert self._error is not None
            raise self._error
        self._owed -= 1
        reply = self._replies.popleft()
        if reply.code == 421 and self._error is None:
            # The server is closing the connection (RFC 5321 §3.8); aiosmtplib closes it too.
            self._fail(SMTPServerDisconnected("Connection closed by the server (421)"))
            self._transport.close()
        return reply

    # --- asyncio.Protocol ---------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self._error is not None:
            return
        self._buffer += data
        try:
            self._parse()
        except SMTPResponseException as exc:
            self._fail(exc)
        if self._replies and self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def eof_received(self) -> bool | None:
        self._fail(SMTPServerDisconnected("Unexpected EOF received"))
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        lost = SMTPServerDisconnected("Connection lost")
        lost.__cause__ = exc
        self._fail(lost)
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    # --- internals ----------------------------------------------------------------------------------
    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
            self._buffer.clear()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _parse(self) -> None:
        """Move every complete reply from the buffer to the queue; raise for anything malformed."""
        buf = self._buffer
        start = 0  # the current reply's first byte
        pos = self._scanned  # the next line's first byte
        while True:
            end = buf.find(b"\n", pos)
            if end < 0:
                break
            if end + 1 - pos > MAX_LINE_LENGTH:
                raise SMTPResponseException(INVALID, "Response too long")
            if not buf[pos:pos + 3].isdigit():
                raise SMTPResponseException(INVALID, "Malformed SMTP response line: "
                                            + bytes(buf[pos:end + 1]).decode("utf-8", "replace"))
            more = buf[pos + 3:pos + 4] == b"-"
            pos = end + 1
            if pos - start > MAX_RESPONSE_LENGTH:
                raise SMTPResponseException(INVALID, "Response too long")
            if more:
                continue
            if len(self._replies) >= self._owed:
                raise SMTPResponseException(INVALID, "Reply without a command: "
                                            + bytes(buf[start:pos]).decode("utf-8", "replace"))
            self._replies.append(_response(bytes(buf[start:pos])))
            start = pos
        if start:
            del buf[:start]
        self._scanned = pos - start
        if len(buf) > MAX_RESPONSE_LENGTH or len(buf) - self._scanned > MAX_LINE_LENGTH:
            raise SMTPResponseException(INVALID, "Response too long")


def _response(raw: bytes) -> SMTPResponse:
    """One complete reply's lines -> (code of the last line, texts joined by newlines), as aiosmtplib."""
    lines = raw.split(b"\n")[:-1]
    text = b"\n".join(line[4:].strip(b" \t\r\n") for line in lines)
    return SMTPResponse(int(lines[-1][:3]), text.decode("utf-8", "surrogateescape"))


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(SMTPReadTimeoutError("Timed out waiting for server response"))
