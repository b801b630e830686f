"""TLS-RPT counts sessions, once each (issue 10 item 12, RFC 8460 §4.4): a policy discovery
failure is reported through the sessions it affected, never as extra sessions of its own.

Real parts: fake DNS, an HTTPS policy host, an aiosmtpd MX with a valid certificate, the SQLite
policy cache and the SQLite result store, driven through `deliver_domain`.
"""

from __future__ import annotations

import asyncio
import datetime
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mta.delivery.attempt import AttemptContext, deliver_domain
from mta.delivery.pool import ConnectionPool
from mta.delivery.smtp_client import Timeouts
from mta.net.dns import Resolver
from mta.sts.cache import PolicyCache
from mta.sts.service import StsService
from mta.tlsrpt.report import PolicySummary
from mta.tlsrpt.store import ResultStore
from tests.support.fake_dns import FakeDns
from tests.support.fake_mx import FakeMx
from tests.support.pki import TestPki
from tests.support.policy_server import PolicyServer

DOMAIN = "count.test"
MX_HOST = "mx1.count.test"
MX_IP = "127.0.0.41"
POLICY_IP = "127.0.0.42"
T0 = 1_800_000_000.0
POLICY = f"version: STSv1\nmode: enforce\nmx: {MX_HOST}\nmax_age: 86400\n"


@dataclass
class Rig:
    dns: FakeDns
    server: PolicyServer
    mx: FakeMx
    store: ResultStore
    ctx: AttemptContext
    sts: StsService

    async def send(self, n: int) -> None:
        """n deliveries at once (they share one policy lookup, STS-88)."""
        outcomes = await asyncio.gather(*(
            deliver_domain(self.ctx, DOMAIN, [f"u{i}@{DOMAIN}"], "a@src.test", b"Subject: x\r\n\r\nhi\r\n")
            for i in range(n)))
        assert all(o.kind == "delivered" for out in outcomes for o in out.values()), outcomes

    async def summaries(self) -> list[PolicySummary]:
        await self.store.flush()
        day = datetime.datetime.fromtimestamp(T0, datetime.UTC).date()
        return self.store.summaries_sync(day).get(DOMAIN, [])


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    pki = TestPki(tmp_path / "pki")
    with FakeDns() as dns_server:
        async with PolicyServer(pki, POLICY_IP) as server, FakeMx(
                MX_IP, hostname=MX_HOST, tls_context=pki.leaf(MX_HOST).server_context()) as mx:
            zone = dns_server.zone
            zone.add(DOMAIN, "MX", f"10 {MX_HOST}.")
            zone.add(MX_HOST, "A", MX_IP)
            zone.add(f"mta-sts.{DOMAIN}", "A", POLICY_IP)
            resolver = Resolver([dns_server.host], port=dns_server.port, timeout=2.0)
            cache = PolicyCache(tmp_path / "sts.db")
            clock = [T0]
            sts = StsService(resolver=resolver, cache=cache, https_port=server.port, ca_file=str(pki.ca_file),
                             fetch_timeout=3.0, clock=lambda: clock[0], rng=random.Random(1))
            store = ResultStore(tmp_path / "tlsrpt.db", sending_ip="127.0.0.1", record_all_sessions=True,
                                clock=lambda: T0)
            pool = ConnectionPool(0.0)
            ctx = AttemptContext(hostname="relay.test", resolver=resolver, pool=pool, timeouts=Timeouts(connect=5.0),
                                 smtp_port=mx.port, ca_file=str(pki.ca_file), sts=sts, recorder=store)
            try:
                yield Rig(dns_server, server, mx, store, ctx, sts)
            finally:
                await store.close()
                await cache.close()


def totals(summaries: list[PolicySummary]) -> tuple[int, int]:
    return sum(s.successful for s in summaries), sum(s.failed for s in summaries)


@pytest.mark.req("STS-91", "STS-93", "STS-88")
async def test_issue10_item12_fetch_failure_shared_by_three_deliveries_counts_three_sessions(rig: Rig) -> None:
    """Issue 10 item 12: three deliveries share one failed policy fetch (no cache, delivered as
    no policy, STS-37): three sessions were made, so three sessions are counted, each failed
    with sts-policy-fetch-error; not 3 discovery failures on top of 3 sessions."""
    rig.dns.zone.add(f"_mta-sts.{DOMAIN}", "TXT", '"v=STSv1; id=A"')
    rig.server.policy(DOMAIN, "not found", status=404)
    await rig.send(3)
    assert len(rig.server.requests) == 1  # one shared lookup (STS-88)
    assert len(rig.mx.sessions) == 3
    summaries = await rig.summaries()
    assert totals(summaries) == (0, 3), summaries
    [summary] = summaries
    assert summary.policy_type == "sts"
    assert [(f.result_type, f.receiving_mx_hostname, f.failed_session_count) for f in summary.failures] == [
        ("sts-policy-fetch-error", MX_HOST, 3)]


@pytest.mark.req("STS-58", "STS-91", "STS-93")
async def test_issue10_item12_failed_refetch_under_cached_policy_counts_one_session(rig: Rig) -> None:
    """Issue 10 item 12: a cached enforce policy applies while its new id cannot be fetched
    (STS-58): one delivery is one session, counted once (failed: the fetch error), not a
    failed discovery plus a successful session."""
    rig.dns.zone.add(f"_mta-sts.{DOMAIN}", "TXT", '"v=STSv1; id=A"')
    rig.server.policy(DOMAIN, POLICY)
    await rig.send(1)
    assert totals(await rig.summaries()) == (1, 0)
    rig.dns.zone.remove(f"_mta-sts.{DOMAIN}", "TXT")
    rig.dns.zone.add(f"_mta-sts.{DOMAIN}", "TXT", '"v=STSv1; id=B"')
    rig.server.policy(DOMAIN, "oops", status=500)
    await rig.send(1)
    summaries = await rig.summaries()
    assert totals(summaries) == (1, 1), summaries
    [summary] = summaries
    assert summary.policy_string[1] == "mode: enforce"
    assert [f.result_type for f in summary.failures] == ["sts-policy-fetch-error"]
