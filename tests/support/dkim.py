"""DKIM keys for tests: fresh keys on disk, their records in the fake DNS zone, and a dkimpy
verifier whose key lookups go to the real fake DNS server (dnspython over loopback UDP)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dkim
import dns.message
import dns.query
import dns.rdatatype

from mta.dkim import keys
from tests.support.fake_dns import FakeDns, Zone


@dataclass(frozen=True)
class DkimTestKey:
    domain: str
    selector: str
    algorithm: str
    path: Path
    record: str  # "v=DKIM1; k=...; p=..."

    def config(self) -> dict[str, Any]:
        """One [[dkim.keys]] table."""
        return {"domain": self.domain, "selector": self.selector, "key_file": str(self.path),
                "algorithm": self.algorithm}

    def publish(self, zone: Zone) -> None:
        chunks = [self.record[i : i + 255] for i in range(0, len(self.record), 255)]
        zone.add(f"{self.selector}._domainkey.{self.domain}", "TXT", " ".join(f'"{c}"' for c in chunks))


_CACHE: dict[str, bytes] = {}


def make_key(folder: Path, domain: str, selector: str, algorithm: str = "rsa-sha256") -> DkimTestKey:
    """A key file in `folder` (RSA-2048 keys are made once per test run: they cost ~100 ms each)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{domain}.{selector}.pem"
    cache_key = f"{algorithm}:{selector}:{domain}"
    if cache_key not in _CACHE:
        _CACHE[cache_key] = keys.private_pem(keys.generate(algorithm))
    path.write_bytes(_CACHE[cache_key])
    from cryptography.hazmat.primitives import serialization

    private = serialization.load_pem_private_key(_CACHE[cache_key], password=None)
    return DkimTestKey(domain, selector, algorithm, path, keys.record_value(private))  # type: ignore[arg-type]


def dns_lookup(server: FakeDns) -> Callable[..., bytes | None]:
    """A dkimpy `dnsfunc` asking `server` over UDP: the TXT strings of the name joined, or None."""
    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        query = dns.message.make_query(name.decode("ascii"), dns.rdatatype.TXT)
        answer = dns.query.udp(query, server.host, port=server.port, timeout=2)
        for rrset in answer.answer:
            for rd in rrset:
                return b"".join(rd.strings)  # type: ignore[attr-defined, no-any-return]
        return None

    return lookup


def verify_all(message: bytes, server: FakeDns) -> list[bool]:
    """dkimpy's verdict on every DKIM-Signature of `message`, top first."""
    lookup = dns_lookup(server)
    d = dkim.DKIM(message)
    count = sum(1 for line in message.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
                if line.lower().startswith(b"dkim-signature:"))
    out = []
    for i in range(count):
        try:
            out.append(bool(d.verify(idx=i, dnsfunc=lookup)))
        except dkim.DKIMException:  # e.g. "body hash mismatch": not verified
            out.append(False)
    return out
