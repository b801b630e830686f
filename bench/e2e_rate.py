"""Quick end-to-end relay rate: submit N 2 KB messages over 20 concurrent sessions to a real
`mta serve`, delivered to a local STARTTLS receiver (aiosmtpd) found through the fake DNS.

    .venv/bin/python bench/e2e_rate.py --n 1000 --mode tls|plain|enforce|dane|dnssec [--tlsrpt] [--metrics]

`dane` and `dnssec` sign the recipient zone and resolve through our own unbound (a warm, caching
validating resolver, tests/support/dnssec.py) with `[dns] dnssec = true`: `dane` publishes a
3 1 1 TLSA record for the MX, `dnssec` is the same signed domain without TLSA.

--metrics turns on the HTTP endpoint (and with it the counting, which is off without it) and
scrapes /metrics every second during the run, as an impatient Prometheus would; at the end the
delivered counter must equal N.

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
    args = ap.parse_args()
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

            if scraper:
                scraper.start()
            cpu0 = tree_cpu(relay.proc.pid)  # type: ignore[union-attr]
            t0 = time.monotonic()
            asyncio.run(run())
            t1 = time.monotonic()
            try:
                mx.wait_for_messages_blocking(len(latencies), timeout=args.timeout)
            except TimeoutError:
                print(run_cli(relay.config, "queue", "list").stdout[-3000:], relay.log_text()[-3000:], file=sys.stderr)
                raise
            t2 = time.monotonic()
            cpu = tree_cpu(relay.proc.pid) - cpu0  # type: ignore[union-attr]
            counted = ""
            if scraper:
                scraper.stop()
                delivered = sum(v for (name, _l), v in scrape(scraper.base).items()
                                if name == "mta_deliveries_total" and ("result", "delivered") in _l)
                counted = f" counted={delivered:.0f} scrapes={scraper.count}"
            latencies.sort()
            n = len(latencies)
            if signed:  # the warm resolver answers from its cache; the fake DNS sees the first lookups only
                print(f"tlsa_queries_upstream={world.dns.count(f'_{world.smtp_port}._tcp.mx1.dst.test', 'TLSA')} ",
                      end="")
            print(f"mode={args.mode} tlsrpt={args.tlsrpt} N={n} submit={n / (t1 - t0):.0f}/s e2e={n / (t2 - t0):.0f}/s "
                  f"p50={latencies[n // 2] * 1000:.1f}ms p99={latencies[int(n * 0.99)] * 1000:.1f}ms "
                  f"sessions={len(mx.sessions)} cpu_ms_per_msg={cpu * 1000 / n:.2f} metrics={args.metrics}{counted}")
        finally:
            if resolver is not None:
                resolver.stop()
            world.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
