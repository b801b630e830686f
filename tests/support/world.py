"""The test world for end-to-end scenarios: DNS, MX hosts, policy hosts and the relay, all on loopback.

    world = World(tmp_path)                      # DNS on 127.0.0.53, a test CA
    mx = world.mx_host("mx1.dst.test", "127.0.0.21")          # STARTTLS with a valid certificate
    world.domain("dst.test", [(10, "mx1.dst.test")])
    world.sts("dst.test", "enforce", ["mx1.dst.test"], txt_id="1")
    relay = world.relay()                         # a real `mta serve` subprocess
    ... submit with smtplib/aiosmtplib to relay.address ...
    world.close()

Every MX host listens on the same port (the relay's `delivery.smtp_port`) at its own 127.0.0.x
address; every `mta-sts.<domain>` name resolves to one HTTPS policy server that picks the
certificate by SNI.
"""

from __future__ import annotations

import contextlib
import random
import signal
import smtplib
import socket
from pathlib import Path
from typing import Any

from tests.support.fake_dns import FakeDns, Zone
from tests.support.fake_mx import FakeMx
from tests.support.pki import TestPki
from tests.support.policy_server import PolicyServer
from tests.support.relay import RelayProcess, base_config, deep_merge, listen_address, write_config

POLICY_ADDRESS = "127.0.0.80"


def _free_port_on(addresses: list[str]) -> int:
    rng = random.Random()
    for _ in range(200):
        port = rng.randint(20000, 60000)
        ok = True
        for a in addresses:
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind((a, port))
                except OSError:
                    ok = False
                    break
        if ok:
            return port
    raise RuntimeError("no free port")


class World:
    def __init__(self, tmp: Path, zone: Zone | None = None) -> None:
        self.tmp = tmp
        self.pki = TestPki(tmp / "pki")
        self.dns = FakeDns(zone=zone, host="127.0.0.53").start()  # zone: e.g. a dnssec.SignedZone
        self.smtp_port = _free_port_on([f"127.0.0.{i}" for i in range(20, 40)])
        self.mxs: dict[str, FakeMx] = {}
        self.policy = PolicyServer(self.pki, POLICY_ADDRESS, port=_free_port_on([POLICY_ADDRESS]))
        self.policy.start_in_thread()
        self.relays: list[RelayProcess] = []
        # The senders' domain, so DSNs have somewhere to go.
        self.sender_mx = self.mx_host("mx.src.test", "127.0.0.20")
        self.domain("src.test", [(10, "mx.src.test")])

    @property
    def zone(self) -> Any:
        return self.dns.zone

    def mx_host(self, name: str, address: str, *, cert: str | None = "valid", **behaviour: Any) -> FakeMx:
        """A receiving MX named `name` on `address` (A record added). cert: valid, expired, untrusted,
        wrong-name, cn-only, or None for no STARTTLS."""
        ctx = None
        if cert == "valid":
            ctx = self.pki.leaf(name).server_context()
        elif cert == "expired":
            ctx = self.pki.leaf(name, expired=True).server_context()
        elif cert == "untrusted":
            ctx = self.pki.leaf(name, untrusted=True).server_context()
        elif cert == "wrong-name":
            ctx = self.pki.leaf("other." + name).server_context()
        elif cert == "cn-only":
            ctx = self.pki.cn_only_leaf(name).server_context()
        mx = FakeMx(address, port=self.smtp_port, hostname=name, tls_context=ctx, **behaviour)
        mx.start_in_thread()
        self.mxs[name] = mx
        self.zone.add(name, "A", address)
        return mx

    def domain(self, domain: str, mx: list[tuple[int, str]]) -> None:
        for pref, host in mx:
            self.zone.add(domain, "MX", f"{pref} {host}.")

    def sts(self, domain: str, mode: str, patterns: list[str], *, txt_id: str = "1", max_age: int = 86400,
            cert: str = "valid", **behaviour: Any) -> None:
        """Publish `_mta-sts.<domain>` and the policy at `mta-sts.<domain>`."""
        self.zone.remove(f"_mta-sts.{domain}", "TXT")
        self.zone.add(f"_mta-sts.{domain}", "TXT", f'"v=STSv1; id={txt_id}"')
        self.zone.remove(f"mta-sts.{domain}", "A")
        self.zone.add(f"mta-sts.{domain}", "A", POLICY_ADDRESS)
        body = "version: STSv1\r\nmode: {}\r\n{}max_age: {}\r\n".format(
            mode, "".join(f"mx: {p}\r\n" for p in patterns), max_age)
        self.policy.policy(domain, body, cert=cert, **behaviour)

    def config(self, **extra: Any) -> dict[str, Any]:
        data = deep_merge(base_config(self.tmp), {
            "dns": {"nameservers": [self.dns.host], "port": self.dns.port},
            "delivery": {"smtp_port": self.smtp_port},
            "tls": {"ca_file": str(self.pki.ca_file)},
            "mta_sts": {"enabled": True, "https_port": self.policy.port},
        })
        return deep_merge(data, extra)

    def relay(self, data: dict[str, Any] | None = None, name: str = "config.toml") -> RelayProcess:
        data = data or self.config()
        relay = RelayProcess(write_config(self.tmp, data, name), data).start()
        self.relays.append(relay)
        return relay

    @staticmethod
    def submit(relay: RelayProcess, rcpts: list[str], *, sender: str = "alice@src.test",
               body: bytes = b"Subject: test\r\n\r\nhello\r\n") -> str:
        host, port = listen_address(relay.data)
        with smtplib.SMTP(host, port, timeout=10) as s:
            s.ehlo()
            s.mail(sender)
            for r in rcpts:
                code, msg = s.rcpt(r)
                assert code == 250, (code, msg)
            code, msg = s.data(body)
            assert code == 250, (code, msg)
            return msg.decode().rsplit(" ", 1)[-1]

    def close(self) -> None:
        for relay in self.relays:  # SIGTERM to all first: several relays drain side by side
            if relay.proc is not None and relay.proc.poll() is None:
                with contextlib.suppress(OSError):
                    relay.proc.send_signal(signal.SIGTERM)
        for relay in self.relays:
            with contextlib.suppress(Exception):
                relay.stop(timeout=10)
            relay.kill()
        for mx in self.mxs.values():
            with contextlib.suppress(Exception):
                mx.stop_thread()
        with contextlib.suppress(Exception):
            self.policy.stop_thread()
        self.dns.stop()
