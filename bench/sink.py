"""A fast SMTP sink for the TLS legs of the benchmark: accepts and discards every message.

Rule: it speaks just enough ESMTP for a relay's client (EHLO/HELO, STARTTLS, MAIL, RCPT, DATA,
RSET, NOOP, QUIT, with PIPELINING) and never refuses mail; it exists because Postfix's
`smtp-sink` cannot offer STARTTLS. Its certificate comes from the benchmark's test CA, so a
relay that verifies (mta `relayhost_tls = "verify"` / MTA-STS enforce, Postfix
`smtp_tls_security_level = secure`) accepts it.

Progress goes to stdout in smtp-sink's `-c` style, one record per change, at most every 5 ms:
`mesg=N tls=T sess=S last=MONOTONIC\\r`, where `last` is time.monotonic() (CLOCK_MONOTONIC is
machine-wide on Linux, so the harness can compare it with its own clock) when message N ended.

Usage: python bench/sink.py --listen 127.0.0.31:2525 [--cert C --key K] [--name mx.sink.test]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import ssl
import sys
import time

MAX_LINE = 4096
MAX_DATA = 64 * 1024 * 1024


class Stats:
    def __init__(self) -> None:
        self.messages = 0
        self.tls_messages = 0
        self.sessions = 0
        self.last = 0.0
        self._dirty = False
        self._scheduled = False

    def bump(self, tls: bool) -> None:
        self.messages += 1
        self.tls_messages += int(tls)
        self.last = time.monotonic()
        self._changed()

    def session(self) -> None:
        self.sessions += 1
        self._changed()

    def _changed(self) -> None:
        self._dirty = True
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_later(0.005, self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if self._dirty:
            self._dirty = False
            record = f"mesg={self.messages} tls={self.tls_messages} sess={self.sessions} last={self.last:.6f}\r"
            sys.stdout.write(record)
            sys.stdout.flush()


class SinkProtocol(asyncio.Protocol):
    """One SMTP session (commands are handled in arrival order, so pipelining just works)."""

    def __init__(self, stats: Stats, name: str, tls_context: ssl.SSLContext | None) -> None:
        self.stats = stats
        self.name = name
        self.tls_context = tls_context
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.in_data = False
        self.tls = False
        self.upgrading = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.stats.session()
        transport.write(f"220 {self.name} ESMTP bench sink\r\n".encode())

    def data_received(self, data: bytes) -> None:
        # While upgrading, reading is paused on the plaintext side (see STARTTLS below), so what
        # arrives here is already-decrypted data sent right after the handshake (a TLS 1.3
        # client's EHLO can come with its Finished, before start_tls() returns to _upgrade):
        # keep it for when _upgrade is done. Plaintext pipelined after STARTTLS was dropped with
        # the buffer (RFC 3207 §4.2).
        self.buf += data
        if not self.upgrading:
            self._process()

    def _reply(self, text: str) -> None:
        assert self.transport is not None
        self.transport.write(text.encode())

    def _process(self) -> None:
        while self.transport is not None and not self.upgrading:
            if self.in_data:
                end = self.buf.find(b"\r\n.\r\n")
                if end < 0:
                    if len(self.buf) > MAX_DATA:
                        self._reply("552 5.3.4 too big\r\n")
                        self.transport.close()
                    return
                del self.buf[: end + 5]
                self.in_data = False
                self.stats.bump(self.tls)
                self._reply("250 2.0.0 Ok: queued\r\n")
                continue
            end = self.buf.find(b"\r\n")
            if end < 0:
                if len(self.buf) > MAX_LINE:
                    self.transport.close()
                return
            line = bytes(self.buf[:end])
            del self.buf[: end + 2]
            self._command(line)

    def _command(self, line: bytes) -> None:
        verb = line[:4].upper()
        if verb == b"EHLO":
            caps = ["PIPELINING", "SIZE 104857600", "8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8"]
            if self.tls_context is not None and not self.tls:
                caps.append("STARTTLS")
            self._reply("".join(f"250-{c}\r\n" for c in [self.name, *caps[:-1]]) + f"250 {caps[-1]}\r\n")
        elif verb == b"HELO":
            self._reply(f"250 {self.name}\r\n")
        elif verb in (b"MAIL", b"RCPT"):
            self._reply("250 2.1.0 Ok\r\n" if verb == b"MAIL" else "250 2.1.5 Ok\r\n")
        elif verb == b"DATA":
            self.in_data = True
            self._reply("354 End data with <CR><LF>.<CR><LF>\r\n")
        elif verb in (b"RSET", b"NOOP"):
            self._reply("250 2.0.0 Ok\r\n")
        elif verb == b"QUIT":
            self._reply("221 2.0.0 Bye\r\n")
            assert self.transport is not None
            self.transport.close()
            self.transport = None
        elif line.upper() == b"STARTTLS" and self.tls_context is not None and not self.tls:
            # Stop reading BEFORE the 220: the ClientHello may follow at once, and bytes read by
            # this plaintext protocol before start_tls() takes over would be lost (a stalled
            # handshake). start_tls() resumes reading itself.
            assert self.transport is not None
            self.transport.pause_reading()
            self._reply("220 2.0.0 Ready to start TLS\r\n")
            self.upgrading = True
            self.buf.clear()
            asyncio.get_running_loop().create_task(self._upgrade())
        else:
            self._reply("502 5.5.2 Error: command not recognized\r\n")

    async def _upgrade(self) -> None:
        assert self.transport is not None and self.tls_context is not None
        loop = asyncio.get_running_loop()
        try:
            new = await loop.start_tls(self.transport, self, self.tls_context, server_side=True,
                                       ssl_handshake_timeout=10)
        except (OSError, ssl.SSLError, ConnectionError, TimeoutError):
            self.transport.abort()
            self.transport = None
            return
        if new is None:
            self.transport = None
            return
        self.transport = new
        self.tls = True
        self.upgrading = False
        self._process()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def serve(host: str, port: int, name: str, tls_context: ssl.SSLContext | None) -> None:
    loop = asyncio.get_running_loop()
    stats = Stats()
    server = await loop.create_server(lambda: SinkProtocol(stats, name, tls_context), host, port, backlog=512,
                                      reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sys.stdout.write("ready\r")
    sys.stdout.flush()
    await stop.wait()
    server.close()
    stats.flush()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--listen", required=True, help="host:port")
    ap.add_argument("--cert", default="")
    ap.add_argument("--key", default="")
    ap.add_argument("--name", default="mx.sink.test")
    args = ap.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    ctx = None
    if args.cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args.cert, args.key or None)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(host, int(port), args.name, ctx))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
