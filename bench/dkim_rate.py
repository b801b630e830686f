"""Durable submission rate with DKIM signing, in one run: unsigned vs RSA-2048 vs Ed25519.

    .venv/bin/python bench/dkim_rate.py [--n 3000] [--rounds 3] [--sessions 20]

Each round starts a real `mta serve` per mode (unsigned, rsa-sha256, ed25519-sha256; the order
rotates every round so drift on a shared machine hits each mode alike), submits N 2 KB messages
with a signed From: domain over `--sessions` SMTP sessions and times the last 250 (each 250
comes after the fsync, so this is the durable submission rate). Delivery runs meanwhile to a
plaintext sink, as in production (a run ends once the first message arrived signed).

Prints the median rate per mode and its ratio to unsigned (issue 12 targets: RSA >= 0.85,
Ed25519 >= 0.95), and the CPU seconds per 1,000 messages of the listener process (the one that
signs): on a shared, loaded machine the wall-clock rate swings with the neighbours, the CPU
cost per message much less. A last table times the signing alone in this process (per 2 KB
message). Not a test: numbers vary with the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiosmtplib

from bench.procstat import children_map, cpu_seconds
from mta.config import DkimConfig
from mta.dkim import keys as dkim_keys
from mta.dkim.signer import Signer
from tests.support.dkim import make_key
from tests.support.relay import listen_address
from tests.support.world import World

MSG = (b"From: Bench <bench@src.test>\r\nTo: u@dst.test\r\nSubject: bench\r\n"
       b"MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n" + (b"x" * 78 + b"\r\n") * 24)
MODES = ("unsigned", "rsa-sha256", "ed25519-sha256")


def one_run(tmp: Path, mode: str, n: int, sessions: int) -> tuple[float, float]:
    """(durable submission rate in msg/s, listener CPU seconds per 1,000 messages)."""
    world = World(tmp)
    world.zone.default_ttl = 300
    try:
        mx = world.mx_host("mx1.dst.test", "127.0.0.21", cert=None)
        world.domain("dst.test", [(10, "mx1.dst.test")])
        extra: dict[str, object] = {}
        if mode != "unsigned":
            key = make_key(tmp / "keys", "src.test", "bench", mode)
            key.publish(world.zone)
            extra["dkim"] = {"enabled": True, "keys": [key.config()]}
        relay = world.relay(world.config(log={"format": "json", "level": "warning"}, mta_sts={"enabled": False},
                                         **extra))
        host, port = listen_address(relay.data)
        assert relay.proc is not None
        (listener,) = children_map().get(relay.proc.pid, [])  # submission.separate_process: the one child
        cpu0 = cpu_seconds([listener])

        async def client(k: int, count: int) -> None:
            async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=60) as c:
                for _ in range(count):
                    await c.sendmail("bench@src.test", [f"u{k}@dst.test"], MSG)

        async def run() -> None:
            await asyncio.gather(*(client(k, n // sessions) for k in range(sessions)))

        t0 = time.monotonic()
        asyncio.run(run())
        sent = n // sessions * sessions
        rate = sent / (time.monotonic() - t0)
        cpu = (cpu_seconds([listener]) - cpu0) / sent * 1000
        # One delivered message shows the signing worked; delivery speed is not what is measured here.
        got = mx.wait_for_messages_blocking(1, timeout=120)
        if mode != "unsigned" and not got[0].data.startswith(b"DKIM-Signature:"):
            raise SystemExit(f"{mode}: delivered mail is not signed")
        return rate, cpu
    finally:
        world.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sessions", type=int, default=20)
    args = ap.parse_args()
    rates: dict[str, list[float]] = {m: [] for m in MODES}
    cpus: dict[str, list[float]] = {m: [] for m in MODES}
    for r in range(args.rounds):
        order = MODES[r % 3:] + MODES[: r % 3]
        for mode in order:
            with tempfile.TemporaryDirectory() as tmp_name:
                rate, cpu = one_run(Path(tmp_name), mode, args.n, args.sessions)
            rates[mode].append(rate)
            cpus[mode].append(cpu)
            print(f"round {r + 1} {mode}: {rate:.0f} msg/s, listener CPU {cpu:.2f} s/1000", flush=True)
    base, base_cpu = statistics.median(rates["unsigned"]), statistics.median(cpus["unsigned"])
    print(f"\nN={args.n} sessions={args.sessions} rounds={args.rounds} (medians)")
    print("mode             rate msg/s  ratio   listener CPU s/1000  CPU ratio (unsigned/mode)")
    for mode in MODES:
        med, cpu = statistics.median(rates[mode]), statistics.median(cpus[mode])
        print(f"{mode:<16} {med:10.0f}  {med / base:5.2f}   {cpu:19.2f}  {base_cpu / cpu:5.2f}")
    print("\nsigning alone, per 2 KB message (this process):")
    for mode in MODES[1:]:
        key = dkim_keys.LoadedKey("src.test", "bench", mode, dkim_keys.generate(mode))
        defaults = DkimConfig()
        signer = Signer([key], defaults.headers, defaults.oversign)
        t = time.perf_counter()
        for _ in range(2000):
            signer.sign_submission(MSG, 0.0)
        print(f"{mode:<16} {(time.perf_counter() - t) / 2000 * 1e6:6.0f} µs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
