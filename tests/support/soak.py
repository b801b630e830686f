"""Crash-and-restart soak: submit and deliver while SIGKILLing `mta serve` at random moments.

Used by tests/e2e/test_crash_delivery.py (few rounds) and bench/crash_soak.py (many rounds).
Each submitted message carries a unique token; after the last round the relay runs until the
queue is empty and we compare what got 250 with what the receiving MX saw.
"""

from __future__ import annotations

import asyncio
import collections
import random
import time
from dataclasses import dataclass
from pathlib import Path

import aiosmtplib

from tests.support.relay import RelayProcess, listen_address, run_cli
from tests.support.world import World


@dataclass
class SoakResult:
    rounds: int
    acked: int
    delivered: int
    lost: int
    duplicates: int
    leftovers: list[str]

    def line(self) -> str:
        return (f"rounds={self.rounds} acked={self.acked} delivered={self.delivered} "
                f"lost={self.lost} duplicates={self.duplicates}")


async def _submit(host: str, port: int, acked: list[str], stop_at: float, clients: int, seq: list[int]) -> None:
    async def client() -> None:
        while time.monotonic() < stop_at:
            try:
                async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=5) as c:
                    while time.monotonic() < stop_at:
                        seq[0] += 1
                        token = f"tok{seq[0]:07d}"
                        body = f"Subject: {token}\r\nX-Token: {token}\r\n\r\n".encode() + (b"y" * 70 + b"\r\n") * 28
                        await c.sendmail("s@src.test", ["bob@dst.test"], body)
                        acked.append(token)  # only after the 250
            except (aiosmtplib.SMTPException, OSError):
                await asyncio.sleep(0.05)

    await asyncio.gather(*(client() for _ in range(clients)))


def run_soak(tmp: Path, rounds: int, *, seed: int = 1, clients: int = 8, round_seconds: float = 1.5,
             drain_timeout: float = 60.0) -> SoakResult:
    rng = random.Random(seed)
    world = World(tmp)
    try:
        mx = world.mx_host("mx1.dst.test", "127.0.0.21")
        world.domain("dst.test", [(10, "mx1.dst.test")])
        data = world.config(delivery={"retry_intervals": ["1s"]})
        host, port = listen_address(data)
        acked: list[str] = []
        seq = [0]
        for _ in range(rounds):
            relay = world.relay(data)

            async def one_round(relay: RelayProcess = relay) -> None:
                task = asyncio.ensure_future(_submit(host, port, acked, time.monotonic() + round_seconds, clients,
                                                     seq))
                # SIGKILL at a random moment: during DATA, right after a 250, mid-delivery or mid-state-write.
                await asyncio.sleep(rng.uniform(0.1, round_seconds))
                relay.kill()
                await task

            asyncio.run(one_round())
        relay = world.relay(data)
        deadline = time.monotonic() + drain_timeout
        leftovers: list[str] = []
        while time.monotonic() < deadline:
            out = run_cli(relay.config, "queue", "list", "--json")
            if out.returncode == 0 and out.stdout.strip() == "[]":
                break
            time.sleep(0.3)
        relay.stop()
        spool = Path(data["queue"]["path"])
        leftovers = [p.name for d in ("tmp", "msg") for p in (spool / d).iterdir()]
        seen = collections.Counter()
        for msg in list(mx.messages):
            for line in msg.data.split(b"\r\n"):
                if line.startswith(b"X-Token: "):
                    seen[line[9:].decode()] += 1
        acked_set = set(acked)
        lost = len(acked_set - set(seen))
        dups = sum(n - 1 for tok, n in seen.items() if n > 1)
        return SoakResult(rounds, len(acked_set), len(set(seen) & acked_set), lost, dups, leftovers)
    finally:
        world.close()
