"""Quick end-to-end relay rate: submit N 2 KB messages over 20 concurrent sessions to a real
`mta serve`, delivered to a local STARTTLS receiver (aiosmtpd) found through the fake DNS.

    .venv/bin/python bench/e2e_rate.py --n 1000 --mode tls|plain|enforce|dane|dnssec [--tlsrpt] [--metrics]

`dane` and `dnssec` sign the recipient zone and resolve through our own unbound (a warm, caching
validating resolver, tests/support/dnssec.py) with `[dns] dnssec = true`: `dane` publishes a
3 1 1 TLSA record for the MX, `dnssec` is the same signed domain without TLSA.

--metrics turns on the HTTP endpoint (and with it the counting, which is off without it) and
scrapes /metrics every second during the run, as an impatient Prometheus would; at the end the
delivered counter must equal N.

--cluster (issue 15) runs the same relay alternately on SQLite and with `[cluster] database` on a
private PostgreSQL (tests/support/postgres.py), `--rounds` times each, and prints the ratio of the
median end-to-end rates and of the CPU per message (cluster / SQLite):

    .venv/bin/python bench/e2e_rate.py --n 1000 --mode enforce --tlsrpt --cluster [--rounds 3]

Prints one line: mode, N, submission rate, end-to-end rate, submission p50/p99, MX sessions, and
the CPU time of the relay's processes per message (steadier than rates on a busy machine).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiosmtplib
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from bench.procstat import tree_cpu
from tests.support.dkim import make_key
from tests.support.dnssec import SignedZone, Unbound
from tests.support.ops import scrape
from tests.support.relay import free_port, listen_address, run_cli
from tests.support.world import World

MSG = b"Subject: bench\r\n\r\n" + (b"x" * 78 + b"\r\n") * 25


class Scraper(threading.Thread):
    """GET /metrics every second until stopped."""

    def __init__(self, base: str) -> None:
        super().__init__(daemon=True)
        self.base = base
        self.count = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(1.0):
            scrape(self.base)
            self.count += 1

    def stop(self) -> None:
        self.done.set()
        self.join()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--mode", choices=("tls", "plain", "enforce", "dane", "dnssec"), default="tls")
    ap.add_argument("--tlsrpt", action="store_true", help="record sessions for TLS reporting")
    ap.add_argument("--timeout", type=float, default=600, help="seconds to wait for every delivery")
    ap.add_argument("--metrics", action="store_true", help="[http] on, /metrics scraped every second")
    ap.add_argument("--cluster", action="store_true", help="compare SQLite with [cluster] database (PostgreSQL)")
    ap.add_argument("--rounds", type=int, default=3, help="with --cluster: runs of each")
    args = ap.parse_args()
    if args.cluster:
        return compare(args)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        signed = args.mode in ("dane", "dnssec")
        zone = SignedZone(default_ttl=300, negative_ttl=300) if signed else None
        world = World(tmp, zone=zone)
        world.zone.default_ttl = 300
        resolver: Unbound | None = None
        try:
            mx = world.mx_host("mx1.dst.test", "127.0.0.21", cert=None if args.mode == "plain" else "valid")
            world.domain("dst.test", [(10, "mx1.dst.test")])
            if args.mode == "enforce":
                world.sts("dst.test", "enforce", ["mx1.dst.test"])
            extra: dict[str, Any] = {}
            if args.tlsrpt:
                key = make_key(tmp / "keys", "relay.test", "rpt")  # report mails must be signed (RPT-18)
                extra = {"tlsrpt": {"enabled": True, "contact_info": "t@relay.test", "report_sender": "r@relay.test",
                                    "db_path": str(tmp / "rpt.db")}, "dkim": {"keys": [key.config()]}}
            if zone is not None:
                leaf = world.pki.leaf("mx1.dst.test")
                mx.tls_context = leaf.server_context()
                if args.mode == "dane":
                    spki = x509.load_pem_x509_certificate(leaf.cert_path.read_bytes()).public_key().public_bytes(
                        Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
                    world.zone.add(f"_{world.smtp_port}._tcp.mx1.dst.test", "TLSA",
                                   f"3 1 1 {hashlib.sha256(spki).hexdigest()}")
                resolver = Unbound(world.dns, [zone.sign("dst.test")], tmp / "unbound", cache=True).start()
                extra.update(dns={"nameservers": [resolver.host], "port": resolver.port, "dnssec": True},
                             dane={"enabled": True})
            if args.metrics:
                extra["http"] = {"listen": f"127.0.0.1:{free_port()}"}
            relay = world.relay(world.config(log={"format": "json", "level": "warning"}, **extra))
            scraper = Scraper(f"http://{extra['http']['listen']}") if args.metrics else None
            line, _e2e, _cpu = measure(relay, mx, args.n, args.timeout, scraper)
            if signed:  # the warm resolver answers from its cache; the fake DNS sees the first lookups only
                print(f"tlsa_queries_upstream={world.dns.count(f'_{world.smtp_port}._tcp.mx1.dst.test', 'TLSA')} ",
                      end="")
            print(f"mode={args.mode} tlsrpt={args.tlsrpt} {line} metrics={args.metrics}")
        finally:
            if resolver is not None:
                resolver.stop()
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
                cpus: dict[str, list[float]] = {"sqlite": [], "postgresql": []}
                for r in range(args.rounds):
                    for kind in rates:
                        spool = tmp / f"{kind}{r}"
                        extra: dict[str, Any] = {
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
                        line, e2e, cpu = measure(relay, mx, args.n, args.timeout)
                        relay.stop()
                        rates[kind].append(e2e)
                        cpus[kind].append(cpu)
                        print(f"{kind:<10} round={r + 1} mode={args.mode} tlsrpt={args.tlsrpt} {line}", flush=True)
                med = {k: statistics.median(v) for k, v in rates.items()}
                cpu_med = {k: statistics.median(v) for k, v in cpus.items()}
                print(f"median e2e: sqlite={med['sqlite']:.0f}/s postgresql={med['postgresql']:.0f}/s "
                      f"ratio={med['postgresql'] / med['sqlite']:.2f}; cpu ms/msg: sqlite={cpu_med['sqlite']:.2f} "
                      f"postgresql={cpu_med['postgresql']:.2f} ratio={cpu_med['postgresql'] / cpu_med['sqlite']:.2f}")
            finally:
                world.close()
    finally:
        pg.destroy()
    return 0


def measure(relay: Any, mx: Any, total: int, timeout: float,
            scraper: Scraper | None = None) -> tuple[str, float, float]:
    """Submit `total` messages over 20 sessions: (result line, end-to-end rate, CPU ms per message).

    With `scraper`, /metrics is scraped meanwhile and the line ends with the delivered count it saw."""
    host, port = listen_address(relay.data)
    latencies: list[float] = []

    async def client(k: int, n: int) -> None:
        async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=30) as c:
            for _ in range(n):
                t = time.monotonic()
                await c.sendmail("s@src.test", [f"u{k}@dst.test"], MSG)
                latencies.append(time.monotonic() - t)

    async def run() -> None:
        await asyncio.gather(*(client(k, total // 20) for k in range(20)))

    if scraper:
        scraper.start()
    cpu0 = tree_cpu(relay.proc.pid)
    t0 = time.monotonic()
    asyncio.run(run())
    t1 = time.monotonic()
    try:
        mx.wait_for_messages_blocking(len(latencies), timeout=timeout)
    except TimeoutError:
        print(run_cli(relay.config, "queue", "list").stdout[-3000:], relay.log_text()[-3000:], file=sys.stderr)
        raise
    t2 = time.monotonic()
    n = len(latencies)
    cpu_ms = (tree_cpu(relay.proc.pid) - cpu0) * 1000 / n
    counted = ""
    if scraper:
        scraper.stop()
        delivered = sum(v for (name, _l), v in scrape(scraper.base).items()
                        if name == "mta_deliveries_total" and ("result", "delivered") in _l)
        counted = f" counted={delivered:.0f} scrapes={scraper.count}"
    latencies.sort()
    return (f"N={n} submit={n / (t1 - t0):.0f}/s e2e={n / (t2 - t0):.0f}/s p50={latencies[n // 2] * 1000:.1f}ms "
            f"p99={latencies[int(n * 0.99)] * 1000:.1f}ms sessions={len(mx.sessions)} cpu_ms_per_msg={cpu_ms:.2f}"
            f"{counted}", n / (t2 - t0), cpu_ms)


if __name__ == "__main__":
    raise SystemExit(main())
