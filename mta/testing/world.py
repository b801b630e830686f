"""A simulated Internet on loopback: DNS, MX hosts, MTA-STS policy hosts and the relay (KIT-1).

    world = World(tmp_path)                      # DNS on 127.0.0.53, a test CA
    mx = world.mx_host("mx1.dst.test")           # STARTTLS with a valid certificate, next 127.0.0.x
    world.domain("dst.test", [(10, "mx1.dst.test")])
    world.sts("dst.test", "enforce", ["mx1.dst.test"], txt_id="1")
    relay = world.relay()                         # a real `mta serve` subprocess
    qid = relay.submit("alice@src.test", ["bob@dst.test"], b"Subject: hi\r\n\r\nhello\r\n")
    [msg] = mx.wait_for_messages(1, timeout=10)
    world.close()                                 # the `mta_world` fixture does this for you

Everything is unprivileged (KIT-2): high ports on 127.0.0.x, nothing written outside `tmp`, no
system resolver changes; the relay is pointed at this DNS server and CA by its config.

Every MX host listens on the same port (the relay's `delivery.smtp_port`) at its own 127.0.0.x
address; every `mta-sts.<domain>` name resolves to one HTTPS policy server that picks the
certificate by SNI.
"""

from __future__ import annotations

import contextlib
import random
import signal
import socket
from pathlib import Path
from typing import Any

from mta.testing.fake_dns import FakeDns, Zone
from mta.testing.fake_mx import FakeMx, ReceivedMessage
from mta.testing.pki import TestPki
from mta.testing.policy_server import PolicyServer
from mta.testing.relay import RelayProcess, base_config, deep_merge, write_config

POLICY_ADDRESS = "127.0.0.80"
SENDER_MX_ADDRESS = "127.0.0.20"
#: MX hosts without an explicit address get the next free one of these (all share `smtp_port`).
MX_ADDRESSES = tuple(f"127.0.0.{i}" for i in range(21, 40))
CERT_CHOICES = ("valid", "expired", "untrusted", "wrong-name", "cn-only", None)


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


class WorldMx(FakeMx):
    """A FakeMx running in its own thread, with a blocking `wait_for_messages` for sync tests."""

    def wait_for_messages(self, n: int, timeout: float = 5.0) -> list[ReceivedMessage]:  # type: ignore[override]
        """Block (bounded) until at least `n` messages arrived; TimeoutError otherwise."""
        return self.wait_for_messages_blocking(n, timeout)


class World:
    """The simulated Internet; see the module docstring. `mta_world` is a fresh one per test."""

    def __init__(self, tmp: Path, zone: Zone | None = None) -> None:
        self.tmp = tmp
        self.mxs: dict[str, FakeMx] = {}
        self._servers: list[FakeMx] = []
        self.relays: list[RelayProcess] = []
        self.pki = TestPki(tmp / "pki")
        # zone: e.g. a signed zone for DNSSEC/DANE tests; a plain Zone otherwise.
        self.dns = FakeDns(zone=zone, host="127.0.0.53").start()
        try:
            self.smtp_port = _free_port_on([SENDER_MX_ADDRESS, *MX_ADDRESSES])
            self.policy = PolicyServer(self.pki, POLICY_ADDRESS, port=_free_port_on([POLICY_ADDRESS]))
            self.policy.start_in_thread()
            # The senders' domain, so DSNs have somewhere to go.
            self.sender_mx = self.mx_host("mx.src.test", SENDER_MX_ADDRESS)
            self.domain("src.test", [(10, "mx.src.test")])
        except BaseException:
            self.close()  # KIT-3: nothing half-started outlives a failed start
            raise

    @property
    def zone(self) -> Any:
        return self.dns.zone

    @property
    def ca_file(self) -> Path:
        """PEM of the CA every "valid" certificate in this world chains to (the relay trusts it)."""
        return self.pki.ca_file

    def _next_address(self) -> str:
        used = {mx.address for mx in self._servers}
        for address in MX_ADDRESSES:
            if address not in used:
                return address
        raise RuntimeError(f"all {len(MX_ADDRESSES)} MX addresses are in use; pass address= explicitly")

    def mx_host(self, name: str, address: str | None = None, *, cert: str | None = "valid",
                **behaviour: Any) -> WorldMx:
        """A receiving MX named `name` (A record added) on `address` (default: the next free 127.0.0.x).

        cert: "valid", "expired", "untrusted", "wrong-name", "cn-only", or None for no STARTTLS.
        `behaviour`: FakeMx knobs (replies, rcpt_replies, greeting, stall_at, ...)."""
        if cert not in CERT_CHOICES:
            raise ValueError(f"mx_host cert={cert!r}: expected one of {CERT_CHOICES}")
        address = address or self._next_address()
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
        mx = WorldMx(address, port=self.smtp_port, hostname=name, tls_context=ctx, **behaviour)
        mx.start_in_thread()
        self.mxs[name] = mx
        self._servers.append(mx)  # a name given twice replaces the lookup, but both get stopped
        self.zone.add(name, "A", address)
        return mx

    def domain(self, domain: str, mx: list[tuple[int, str]]) -> None:
        """Add MX records for `domain`: [(preference, host)]; [(0, ".")] publishes a null MX (RFC 7505)."""
        for pref, host in mx:
            self.zone.add(domain, "MX", f"{pref} {host if host.endswith('.') else host + '.'}")

    def sts(self, domain: str, mode: str, patterns: list[str], *, txt_id: str = "1", max_age: int = 86400,
            cert: str = "valid", **behaviour: Any) -> None:
        """Publish `_mta-sts.<domain>` (id `txt_id`) and the policy (mode, mx `patterns`, `max_age`) at
        https://mta-sts.<domain>/.well-known/mta-sts.txt; `cert`: that host's certificate kind."""
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

    def relay(self, config: dict[str, Any] | None = None, name: str = "config.toml") -> RelayProcess:
        """Start a real `mta serve` wired to this world; `config`: TOML keys merged over `config()`."""
        data = deep_merge(self.config(), config or {})
        relay = RelayProcess(write_config(self.tmp, data, name), data)
        self.relays.append(relay)  # before start: close() stops it even if waiting for it fails
        return relay.start()

    @staticmethod
    def submit(relay: RelayProcess, rcpts: list[str], *, sender: str = "alice@src.test",
               body: bytes = b"Subject: test\r\n\r\nhello\r\n") -> str:
        return relay.submit(sender, rcpts, body)

    def close(self) -> None:
        """Stop every relay, MX, the policy host and DNS (idempotent; the fixture calls it, KIT-3)."""
        for relay in self.relays:  # SIGTERM to all first: several relays drain side by side
            if relay.proc is not None and relay.proc.poll() is None:
                with contextlib.suppress(OSError):
                    relay.proc.send_signal(signal.SIGTERM)
        for relay in self.relays:
            with contextlib.suppress(Exception):
                relay.stop(timeout=10)
            relay.kill()
        for mx in self._servers:
            with contextlib.suppress(Exception):
                mx.stop_thread()
        if hasattr(self, "policy"):
            with contextlib.suppress(Exception):
                self.policy.stop_thread()
        self.dns.stop()
