"""Messages to a dead MX per minute, without and with the unreachable cache (SMTP-37).

    .venv/bin/python bench/dead_mx.py [--n 300] [--timeout 5]

The only MX of dead.test is a black hole on loopback: a listening socket whose accept queue is
full, so every SYN is dropped and each connection attempt costs the whole `connect_timeout`
(scaled down from the default 30 s to --timeout). N messages are submitted at once to a real
`mta serve` (default concurrency: 50 messages, 20 per domain); the figure is first attempts
finished (deferred) per minute, once with `delivery.unreachable_time = "0s"` (cache off: every
message pays the timeout) and once with "5m" (only the first attempts pay it).
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.world import World

DEAD_IP = "127.0.0.30"


def black_hole(port: int) -> list[socket.socket]:
    """A listener on DEAD_IP:port with a full accept queue: further SYNs go unanswered."""
    server = socket.socket()
    server.bind((DEAD_IP, port))
    server.listen(0)
    held = [server]
    for _ in range(3):
        c = socket.socket()
        c.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            c.connect((DEAD_IP, port))
        held.append(c)
    time.sleep(0.2)
    return held


def run(n: int, timeout: float, unreachable_time: str) -> tuple[float, int]:
    """Seconds until all N first attempts are deferred, and the deferrals that were skips."""
    with tempfile.TemporaryDirectory() as tmp_name:
        world = World(Path(tmp_name))
        held: list[socket.socket] = []
        try:
            held = black_hole(world.smtp_port)
            world.zone.add("mx.dead.test", "A", DEAD_IP)
            world.domain("dead.test", [(10, "mx.dead.test")])
            relay = world.relay(world.config(
                mta_sts={"enabled": False},
                delivery={"connect_timeout": f"{timeout}s", "retry_intervals": ["1h"],
                          "unreachable_time": unreachable_time}))
            started = time.monotonic()
            for i in range(n):
                world.submit(relay, [f"u{i}@dead.test"])
            events = relay.wait_event("deferred", count=n, timeout=n * timeout + 60)
            elapsed = time.monotonic() - started
            skipped = sum(1 for e in events if "skipped" in str(e.get("reply", "")))
            return elapsed, skipped
        finally:
            for s in held:
                s.close()
            world.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--timeout", type=float, default=5.0, help="delivery.connect_timeout in seconds")
    args = ap.parse_args()
    for label, ttl in (("cache off (before)", "0s"), ("cache on (after)", "5m")):
        elapsed, skipped = run(args.n, args.timeout, ttl)
        print(f"{label}: N={args.n} connect_timeout={args.timeout:g}s  {elapsed:.1f} s  "
              f"{args.n / elapsed * 60:.0f} messages/min  ({skipped} skipped without connecting)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
