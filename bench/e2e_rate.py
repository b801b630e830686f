"""Quick end-to-end relay rate: submit N 2 KB messages over 20 concurrent sessions to a real
`mta serve`, delivered to a local STARTTLS receiver (aiosmtpd) found through the fake DNS.

    .venv/bin/python bench/e2e_rate.py --n 1000 --mode tls|plain|enforce|dane|dnssec [--tlsrpt]

`dane` and `dnssec` sign the recipient zone and resolve through our own unbound (a warm, caching
validating resolver, tests/support/dnssec.py) with `[dns] dnssec = true`: `dane` publishes a
3 1 1 TLSA record for the MX, `dnssec` is the same signed domain without TLSA.

Prints one line: mode, N, submission rate, end-to-end rate, submission p50/p99, MX sessions.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiosmtplib
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.support.dkim import make_key
from tests.support.dnssec import SignedZone, Unbound
from tests.support.relay import listen_address
from tests.support.world import World

MSG = b"Subject: bench\r\n\r\n" + (b"x" * 78 + b"\r\n") * 25


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--mode", choices=("tls", "plain", "enforce", "dane", "dnssec"), default="tls")
    ap.add_argument("--tlsrpt", action="store_true", help="record sessions for TLS reporting")
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
            extra: dict[str, object] = {}
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
            if signed:  # the warm resolver answers from its cache; the fake DNS sees the first lookups only
                print(f"tlsa_queries_upstream={world.dns.count(f'_{world.smtp_port}._tcp.mx1.dst.test', 'TLSA')} ",
                      end="")
            print(f"mode={args.mode} tlsrpt={args.tlsrpt} N={n} submit={n / (t1 - t0):.0f}/s e2e={n / (t2 - t0):.0f}/s "
                  f"p50={latencies[n // 2] * 1000:.1f}ms p99={latencies[int(n * 0.99)] * 1000:.1f}ms "
                  f"sessions={len(mx.sessions)}")
        finally:
            if resolver is not None:
                resolver.stop()
            world.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
