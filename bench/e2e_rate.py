"""Quick end-to-end relay rate: submit N 2 KB messages over 20 concurrent sessions to a real
`mta serve`, delivered to a local STARTTLS receiver (aiosmtpd) found through the fake DNS.

    .venv/bin/python bench/e2e_rate.py --n 1000 --mode tls|plain|enforce [--tlsrpt]
    .venv/bin/python bench/e2e_rate.py --n 1000 --mode enforce --tlsrpt --cluster [--rounds 3]

Prints one line: mode, N, submission rate, end-to-end rate, submission p50/p99, MX sessions.
--cluster (issue 15) runs the same relay alternately on SQLite and with `[cluster] database` on a
private PostgreSQL (tests/support/postgres.py), `--rounds` times each, and prints the ratio of the
median end-to-end rates (cluster / SQLite).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiosmtplib

from tests.support.dkim import make_key
from tests.support.relay import listen_address
from tests.support.world import World

MSG = b"Subject: bench\r\n\r\n" + (b"x" * 78 + b"\r\n") * 25


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--mode", choices=("tls", "plain", "enforce"), default="tls")
    ap.add_argument("--tlsrpt", action="store_true", help="record sessions for TLS reporting")
    ap.add_argument("--cluster", action="store_true", help="compare SQLite with [cluster] database (PostgreSQL)")
    ap.add_argument("--rounds", type=int, default=3, help="with --cluster: runs of each")
    args = ap.parse_args()
    if args.cluster:
        return compare(args)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        world = World(tmp)
        world.zone.default_ttl = 300
        try:
            mx = world.mx_host("mx1.dst.test", "127.0.0.21", cert=None if args.mode == "plain" else "valid")
            world.domain("dst.test", [(10, "mx1.dst.test")])
            if args.mode == "enforce":
                world.sts("dst.test", "enforce", ["mx1.dst.test"])
            extra: dict[str, object] = {}
            if args.tlsrpt:
                key = make_key(tmp / "keys", "relay.test", "rpt")  # report mails must be signed (RPT-18)
                extra = {"tlsrpt": {"enabled": True, "contact_info": "t@relay.test", "report_sender": "r@relay.test",
                                    "db_path": str(tmp / "rpt.db")}, "dkim": {"keys": [key.config()]}}
            relay = world.relay(world.config(log={"format": "json", "level": "warning"}, **extra))
            host, port = listen_address(relay.data)
            latencies: list[float] = []

            async def client(k: int, n: int) -> None:
                async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=30) as c:
                    for _ in range(n):
                        t = time.monotonic()
                        await c.sendmail("s@src.test", [f"u{k}@dst.test"], MSG)
                        latencies.append(time.monotonic() - t)

            async def run() -> None:
                await asyncio.gather(*(client(k, args.n // 20) for k in range(20)))

            t0 = time.monotonic()
            asyncio.run(run())
            t1 = time.monotonic()
            mx.wait_for_messages_blocking(len(latencies), timeout=600)
            t2 = time.monotonic()
            latencies.sort()
            n = len(latencies)
            print(f"mode={args.mode} tlsrpt={args.tlsrpt} N={n} submit={n / (t1 - t0):.0f}/s e2e={n / (t2 - t0):.0f}/s "
                  f"p50={latencies[n // 2] * 1000:.1f}ms p99={latencies[int(n * 0.99)] * 1000:.1f}ms "
                  f"sessions={len(mx.sessions)}")
        finally:
            world.close()
    return 0


def compare(args: argparse.Namespace) -> int:
    """SQLite vs PostgreSQL state stores, alternating in one run (same world, same MX, fresh spools)."""
    import statistics

    from tests.support.postgres import PostgresServer
    from tests.support.relay import deep_merge

    pg = PostgresServer().start()
    try:
        with tempfile.TemporaryDirectory() as tmp_name:
            tmp = Path(tmp_name)
            world = World(tmp)
            world.zone.default_ttl = 300
            try:
                mx = world.mx_host("mx1.dst.test", "127.0.0.21", cert=None if args.mode == "plain" else "valid")
                world.domain("dst.test", [(10, "mx1.dst.test")])
                if args.mode == "enforce":
                    world.sts("dst.test", "enforce", ["mx1.dst.test"])
                rates: dict[str, list[float]] = {"sqlite": [], "postgresql": []}
                for r in range(args.rounds):
                    for kind in rates:
                        spool = tmp / f"{kind}{r}"
                        extra: dict[str, object] = {
                            "queue": {"path": str(spool)}, "mta_sts": {"cache_path": str(spool / "sts.db")},
                            "log": {"format": "json", "level": "warning"}}
                        if args.tlsrpt:
                            key = make_key(tmp / "keys", "relay.test", "rpt")  # report mails are signed (RPT-18)
                            extra["tlsrpt"] = {"enabled": True, "contact_info": "t@relay.test",
                                               "report_sender": "r@relay.test", "db_path": str(spool / "rpt.db")}
                            extra["dkim"] = {"keys": [key.config()]}
                        if kind == "postgresql":
                            extra["cluster"] = {"database": pg.create_database(), "node_name": f"bench{r}"}
                        relay = world.relay(deep_merge(world.config(), extra), name=f"{kind}{r}.toml")
                        mx.clear()
                        line, e2e = measure(relay, mx, args.n)
                        relay.stop()
                        rates[kind].append(e2e)
                        print(f"{kind:<10} round={r + 1} mode={args.mode} tlsrpt={args.tlsrpt} {line}", flush=True)
                med = {k: statistics.median(v) for k, v in rates.items()}
                print(f"median e2e: sqlite={med['sqlite']:.0f}/s postgresql={med['postgresql']:.0f}/s "
                      f"ratio={med['postgresql'] / med['sqlite']:.2f}")
            finally:
                world.close()
    finally:
        pg.destroy()
    return 0


def measure(relay: object, mx: object, total: int) -> tuple[str, float]:
    """Submit `total` messages over 20 sessions; (result line, end-to-end rate)."""
    host, port = listen_address(relay.data)  # type: ignore[attr-defined]
    latencies: list[float] = []

    async def client(k: int, n: int) -> None:
        async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=30) as c:
            for _ in range(n):
                t = time.monotonic()
                await c.sendmail("s@src.test", [f"u{k}@dst.test"], MSG)
                latencies.append(time.monotonic() - t)

    async def run() -> None:
        await asyncio.gather(*(client(k, total // 20) for k in range(20)))

    t0 = time.monotonic()
    asyncio.run(run())
    t1 = time.monotonic()
    mx.wait_for_messages_blocking(len(latencies), timeout=600)  # type: ignore[attr-defined]
    t2 = time.monotonic()
    latencies.sort()
    n = len(latencies)
    return (f"N={n} submit={n / (t1 - t0):.0f}/s e2e={n / (t2 - t0):.0f}/s p50={latencies[n // 2] * 1000:.1f}ms "
            f"p99={latencies[int(n * 0.99)] * 1000:.1f}ms sessions={len(mx.sessions)}",  # type: ignore[attr-defined]
            n / (t2 - t0))


if __name__ == "__main__":
    raise SystemExit(main())
