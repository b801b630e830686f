"""The resolver's DNSSEC view (DANE-1..3) against a real validating unbound and zones signed in the test."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from mta.dane import lookup
from mta.dane.decide import AUTHENTICATE, BOGUS, NOT_APPLICABLE
from mta.errors import DnsTemporaryError
from mta.net.dns import Resolver
from tests.support.dnssec import SignedZone, Unbound
from tests.support.fake_dns import FakeDns

TLSA = "3 1 1 " + "ab" * 32


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[SignedZone, FakeDns, Unbound]]:
    zone = SignedZone()
    with FakeDns(zone=zone) as fake:
        anchor = zone.sign("dane.test")
        zone.add("dane.test", "MX", "10 mx1.dane.test.")
        zone.add("mx1.dane.test", "A", "127.0.0.21")
        zone.add("_25._tcp.mx1.dane.test", "TLSA", TLSA)
        zone.add("alias.dane.test", "CNAME", "target.dane.test.")
        zone.add("target.dane.test", "A", "127.0.0.22")
        zone.add("_25._tcp.target.dane.test", "TLSA", TLSA)
        zone.add("implicit.dane.test", "A", "127.0.0.23")
        zone.add("plain.test", "MX", "10 mx.plain.test.")
        zone.add("mx.plain.test", "A", "127.0.0.24")
        zone.add("_25._tcp.mx.plain.test", "TLSA", TLSA)
        with Unbound(fake, [anchor], tmp_path / "unbound") as resolver:
            yield zone, fake, resolver


def resolver_for(unbound: Unbound, dnssec: bool = True) -> Resolver:
    return Resolver([unbound.host], port=unbound.port, timeout=3, dnssec=dnssec)


def test_dane_1_secure_flags(setup: tuple[SignedZone, FakeDns, Unbound]) -> None:
    _zone, _fake, unbound = setup
    r = resolver_for(unbound)

    async def run() -> None:
        assert (await r.mx("dane.test")).secure
        assert not (await r.mx("plain.test")).secure
        assert (await r.mx("implicit.dane.test")).secure  # implicit MX: the address records
        addrs = await r.address_answer("mx1.dane.test")
        assert addrs.secure and addrs.addresses == ["127.0.0.21"]
        assert not (await r.address_answer("mx.plain.test")).secure
        assert (await r.tlsa("_25._tcp.mx1.dane.test")).secure
        assert not (await r.tlsa("_25._tcp.mx.plain.test")).secure
        none = await r.tlsa("_25._tcp.nothing.dane.test")
        assert none.records == ()  # NXDOMAIN: no TLSA (DANE then does not apply)
    asyncio.run(run())


def test_dane_1_without_dnssec_nothing_is_secure(setup: tuple[SignedZone, FakeDns, Unbound]) -> None:
    _zone, _fake, unbound = setup
    r = resolver_for(unbound, dnssec=False)
    assert not asyncio.run(r.mx("dane.test")).secure


def test_dane_2_secure_cname_target_is_the_first_base(setup: tuple[SignedZone, FakeDns, Unbound]) -> None:
    _zone, _fake, unbound = setup
    r = resolver_for(unbound)

    async def run() -> None:
        addrs = await r.address_answer("alias.dane.test")
        assert addrs.secure and addrs.canonical == "target.dane.test"
        verdict = await lookup.host_verdict(r, "alias.dane.test", 25, enabled=True, mx_secure=True, addresses=addrs)
        assert verdict.kind == AUTHENTICATE and verdict.base == "target.dane.test"
        assert verdict.names == ("alias.dane.test", "target.dane.test")
    asyncio.run(run())


def test_dane_1_insecure_host_never_gets_a_tlsa_query(setup: tuple[SignedZone, FakeDns, Unbound]) -> None:
    _zone, fake, unbound = setup
    r = resolver_for(unbound)

    async def run() -> None:
        addrs = await r.address_answer("mx.plain.test")
        verdict = await lookup.host_verdict(r, "mx.plain.test", 25, enabled=True, mx_secure=True, addresses=addrs)
        assert verdict.kind == NOT_APPLICABLE
    asyncio.run(run())
    assert fake.count("_25._tcp.mx.plain.test", "TLSA") == 0


@pytest.mark.parametrize("how", ["expired", "missing", "bad"])
def test_dane_3_bogus_tlsa_is_a_failure_not_no_tlsa(setup: tuple[SignedZone, FakeDns, Unbound], how: str) -> None:
    zone, _fake, unbound = setup
    zone.break_rrset("_25._tcp.mx1.dane.test", "TLSA", how)
    r = resolver_for(unbound)

    async def run() -> None:
        with pytest.raises(DnsTemporaryError):
            await r.tlsa("_25._tcp.mx1.dane.test")
        addrs = await r.address_answer("mx1.dane.test")
        verdict = await lookup.host_verdict(r, "mx1.dane.test", 25, enabled=True, mx_secure=True, addresses=addrs)
        assert verdict.kind == BOGUS
    asyncio.run(run())
