"""Latency probe: one extra SMTP session that times every message it submits.

Rule: `smtp-source` drives the load but reports no per-message timings, so the harness runs it
with one session fewer and this probe as the last session, sending the same shape of message
(smtp-source's headers and 80-column `1XXX...` payload lines) the same way (HELO, no
pipelining). Its latencies are what one light client saw beside smtp-source's busy process: the
same as every session's where all sessions are served alike (one event loop), better than the
average session's where the OS favours a light process (a process per session); bench/README.md
"Reading the latency figures" compares them with the all-session mean. What is timed:

- many per connection (`--reuse`): from sending MAIL FROM to reading the reply to the final dot;
- one per connection: from connect() to reading the reply to the final dot (banner and HELO
  included, as a client that opens a connection per message sees it).

Prints one JSON object: {"latencies": [seconds...], "errors": n, "start": t, "end": t} with
time.monotonic() stamps. Every socket operation has a timeout; the probe gives up after
MAX_ERRORS failed messages.
"""

from __future__ import annotations

import argparse
import email.utils
import json
import socket
import sys
import time

MAX_ERRORS = 20
TIMEOUT = 60.0


def make_message(sender: str, rcpt: str, helo: str, size: int, seq: int) -> bytes:
    """The same layout as smtp-source -l SIZE: four headers, then SIZE bytes of 80-byte lines."""
    head = (f"From: <{sender}>\r\nTo: <{rcpt}>\r\nDate: {email.utils.formatdate(usegmt=True)}\r\n"
            f"Message-Id: <probe.{seq}@{helo}>\r\n\r\n")
    lines, total, n = [], 0, 1
    while total < size:
        line = (str(n) + "X" * 78)[: min(78, size - total)] + "\r\n"
        lines.append(line)
        total += len(line)
        n += 1
    return (head + "".join(lines)).encode()


class Client:
    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def reply(self) -> int:
        """Read one (possibly multi-line) reply; return its code."""
        while True:
            end = self.buf.find(b"\r\n")
            while end >= 0:
                line, self.buf = self.buf[:end], self.buf[end + 2 :]
                if len(line) < 4 or line[3:4] != b"-":
                    return int(line[:3])
                end = self.buf.find(b"\r\n")
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("server closed the connection")
            self.buf += chunk

    def cmd(self, text: bytes, want: int) -> None:
        self.sock.sendall(text)
        code = self.reply()
        if code // 100 != want // 100:
            raise ConnectionError(f"{text[:20]!r} -> {code}")

    def send(self, sender: str, rcpt: str, body: bytes) -> None:
        self.cmd(f"MAIL FROM:<{sender}>\r\n".encode(), 250)
        self.cmd(f"RCPT TO:<{rcpt}>\r\n".encode(), 250)
        self.cmd(b"DATA\r\n", 354)
        self.cmd(body + b".\r\n", 250)

    def close(self) -> None:
        try:
            self.sock.sendall(b"QUIT\r\n")
            self.reply()
        except OSError:
            pass
        finally:
            self.sock.close()


def run(host: str, port: int, count: int, size: int, reuse: bool, sender: str, rcpt: str, helo: str) -> dict:
    latencies: list[float] = []
    errors = 0
    start = time.monotonic()
    client: Client | None = None
    for seq in range(count):
        if errors >= MAX_ERRORS:
            break
        body = make_message(sender, rcpt, helo, size, seq)
        t0 = time.monotonic()
        try:
            if client is None:
                client = Client(host, port)
                if client.reply() // 100 != 2:  # the banner
                    raise ConnectionError("no 220 banner")
                client.cmd(f"HELO {helo}\r\n".encode(), 250)
                if reuse:
                    t0 = time.monotonic()
            client.send(sender, rcpt, body)
            latencies.append(time.monotonic() - t0)
        except (OSError, ValueError) as exc:
            errors += 1
            print(f"probe: message {seq}: {exc}", file=sys.stderr)
            if client is not None:
                client.sock.close()
            client = None
            continue
        if not reuse:
            client.close()
            client = None
    if client is not None:
        client.close()
    return {"latencies": latencies, "errors": errors, "start": start, "end": time.monotonic()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--host", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--reuse", action="store_true", help="many messages per connection")
    ap.add_argument("--from", dest="sender", default="probe@source.test")
    ap.add_argument("--to", dest="rcpt", required=True)
    ap.add_argument("--helo", default="source.test")
    args = ap.parse_args(argv)
    result = run(args.host, args.port, args.count, args.size, args.reuse, args.sender, args.rcpt, args.helo)
    json.dump(result, sys.stdout)
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
