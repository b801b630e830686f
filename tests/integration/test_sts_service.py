"""Policy discovery (mta.sts.service) with real DNS, HTTPS and SQLite parts (checklist 1E, STS-36/88).

Time is an injected clock, so max_age and the back-off are crossed without sleeping. Every test
names its checklist item; O-HTTP is the policy server's request log, O-DNS the fake DNS query log.
"""

from __future__ import annotations

import asyncio
import logging
import random
from pathlib import Path

import pytest

from mta.net.dns import Resolver
from mta.sts.cache import PolicyCache
from mta.sts.policy import Policy
from mta.sts.service import PolicyResult, StsService
from tests.support.fake_dns import FakeDns
from tests.support.pki import TestPki
from tests.support.policy_server import JSON_PATH, TXT_PATH, PolicyServer

SERVER_IP = "127.0.0.5"
DOMAIN = "example.test"
HOST = f"mta-sts.{DOMAIN}"
TXT_NAME = f"_mta-sts.{DOMAIN}"
T0 = 1_800_000_000.0
DAY = 86400.0


def policy_text(mode: str = "enforce", max_age: int = 86400, mx: str = "mx1.example.test") -> str:
    mx_line = f"mx: {mx}\n" if mx else ""
    return f"version: STSv1\nmode: {mode}\n{mx_line}max_age: {max_age}\n"


class Clock:
    now = T0

    def __call__(self) -> float:
        return self.now


class World:
    """Fake DNS + policy server + cache file, and a factory for services sharing them."""

    def __init__(self, tmp: Path, pki: TestPki, dns_server: FakeDns, server: PolicyServer) -> None:
        self.tmp, self.pki, self.dns, self.server = tmp, pki, dns_server, server
        self.clock = Clock()
        self.caches: list[PolicyCache] = []
        self.dns.zone.add(HOST, "A", SERVER_IP)

    def txt(self, value: str, name: str = TXT_NAME) -> None:
        """Replace the TXT RRset at `name` with one record."""
        self.dns.zone.remove(name, "TXT")
        self.dns.zone.add(name, "TXT", f'"{value}"')

    def serve(self, text: str = policy_text(), **behaviour: object) -> None:
        self.server.policy(DOMAIN, text, **behaviour)  # type: ignore[arg-type]

    def service(self, cache_path: Path | None = None, **kwargs: object) -> StsService:
        cache = PolicyCache(cache_path or self.tmp / "sts.db")
        self.caches.append(cache)
        return StsService(
            resolver=Resolver([self.dns.host], port=self.dns.port, timeout=1.0),
            cache=cache,
            https_port=self.server.port,
            ca_file=str(self.pki.ca_file),
            fetch_timeout=2.0,
            clock=self.clock,
            rng=random.Random(7),
            **kwargs,  # type: ignore[arg-type]
        )

    @property
    def fetches(self) -> int:
        return len(self.server.requests)


@pytest.fixture
def world(sts_world: World) -> World:
    return sts_world


def mode_of(result: PolicyResult) -> str | None:
    return result.policy.mode if result.policy else None


# ----- discovery and the cache (1E) -----------------------------------------------------------


async def test_sts_55_fetch_once_then_serve_from_cache(world: World) -> None:
    """STS-55: id A, no cache -> one fetch, cached with expiry fetched_at + max_age; the next
    lookup with TXT still A and the cache fresh makes no HTTPS request."""
    world.txt("v=STSv1; id=A")
    world.serve()
    sts = world.service()
    first = await sts.get_policy(DOMAIN)
    assert (first.source, first.txt_id, mode_of(first), first.failure) == ("fetched", "A", "enforce", None)
    entry = await sts.cache.get(DOMAIN)
    assert entry is not None and (entry.txt_id, entry.fetched_at, entry.expires_at) == ("A", T0, T0 + DAY)
    world.clock.now += 3600
    second = await sts.get_policy(DOMAIN)
    assert (second.source, mode_of(second)) == ("cache", "enforce")
    assert world.fetches == 1
    assert world.dns.count(TXT_NAME, "TXT") == 2  # the TXT record is still checked every time


async def test_sts_9_no_record_no_policy_no_request(world: World) -> None:
    """STS-9: no TXT RRset and nothing cached -> no policy, no HTTPS request."""
    world.serve()
    result = await world.service().get_policy(DOMAIN)
    assert (result.policy, result.source, result.failure) == (None, "none", None)
    assert world.fetches == 0


@pytest.mark.parametrize(
    "records", [["v=STSv1; id=1", "v=STSv1; id=2"], ["v=STSv1; id=a_b"], ["v=STSv1;"]], ids=["two", "bad-id", "no-id"]
)
async def test_sts_11_12_unusable_record_means_no_fetch(world: World, records: list[str]) -> None:
    """STS-11/12: two STS records or an invalid one -> no usable record: no fetch, no policy."""
    for value in records:
        world.dns.zone.add(TXT_NAME, "TXT", f'"{value}"')
    world.serve()
    result = await world.service().get_policy(DOMAIN)
    assert result.policy is None and "no-usable-record" in result.reason
    assert world.fetches == 0


async def test_sts_24_txt_servfail_without_cache_is_no_policy(world: World) -> None:
    """STS-24 [DECISION]: TXT SERVFAIL and nothing cached -> continue without a policy."""
    world.dns.zone.set_rcode(TXT_NAME, "SERVFAIL")
    world.serve()
    result = await world.service().get_policy(DOMAIN)
    assert result.policy is None and result.reason.startswith("txt-dns-error")
    assert world.fetches == 0


@pytest.mark.parametrize("change", ["servfail", "nxdomain", "invalid", "multiple"])
async def test_sts_56_cached_policy_survives_txt_trouble(world: World, change: str) -> None:
    """STS-56: cached unexpired enforce + TXT now fails / NXDOMAIN / invalid / multiple -> still enforce."""
    world.txt("v=STSv1; id=A")
    world.serve()
    sts = world.service()
    assert mode_of(await sts.get_policy(DOMAIN)) == "enforce"
    if change == "servfail":
        world.dns.zone.set_rcode(TXT_NAME, "SERVFAIL")
    elif change == "nxdomain":
        world.dns.zone.remove(TXT_NAME)
    elif change == "invalid":
        world.txt("v=STSv1; id=")
    else:
        world.dns.zone.add(TXT_NAME, "TXT", '"v=STSv1; id=B"')
    world.clock.now += 3600
    result = await sts.get_policy(DOMAIN)
    assert (result.source, mode_of(result), result.txt_id) == ("cache", "enforce", "A")
    assert world.fetches == 1


async def test_sts_57_removed_record_keeps_policy_until_expiry(world: World) -> None:
    """STS-57: TXT removed -> cached policy not deleted; it applies until max_age, then no policy."""
    world.txt("v=STSv1; id=A")
    world.serve()
    sts = world.service()
    await sts.get_policy(DOMAIN)
    world.dns.zone.remove(TXT_NAME)
    world.clock.now = T0 + DAY - 1
    assert mode_of(await sts.get_policy(DOMAIN)) == "enforce"
    world.clock.now = T0 + DAY + 1
    expired = await sts.get_policy(DOMAIN)
    assert expired.policy is None and expired.source == "none"
    assert await sts.cache.get(DOMAIN) is not None  # never purged because the record went away
    assert world.fetches == 1


@pytest.mark.req("STS-36", "STS-91")
@pytest.mark.parametrize(
    "failure",
    [
        ({"status": 500}, "sts-policy-fetch-error"),
        ({"cert": "untrusted"}, "sts-webpki-invalid"),
        ({"text": "garbage\n"}, "sts-policy-invalid"),
        ({"stall": "after-headers"}, "sts-policy-fetch-error"),
    ],
    ids=["http-500", "bad-cert", "invalid-body", "timeout"],
)
async def test_sts_58_id_change_with_failed_fetch_keeps_cached_enforce(
    world: World, failure: tuple[dict[str, object], str]
) -> None:
    """STS-58: cached enforce (id A), TXT id -> B, fetch fails -> cached enforce still applies, the
    failure is reported (STS-91) and the fetch is not retried within 5 minutes (STS-36)."""
    behaviour, result_type = failure
    world.txt("v=STSv1; id=A")
    world.serve()
    sts = world.service()
    await sts.get_policy(DOMAIN)
    world.txt("v=STSv1; id=B")
    text = str(behaviour.pop("text", policy_text(mode="testing")))
    world.serve(text, **behaviour)
    world.clock.now += 60
    result = await sts.get_policy(DOMAIN)
    assert (result.source, mode_of(result), result.txt_id) == ("cache", "enforce", "A")
    assert result.failure is not None and result.failure.result_type == result_type
    requests_after_failure = len(world.server.sni_seen)
    world.clock.now += 299
    again = await sts.get_policy(DOMAIN)
    assert mode_of(again) == "enforce" and again.reason == "fetch-backoff"
    assert len(world.server.sni_seen) == requests_after_failure  # no new connection at all
    world.serve(policy_text(mode="testing"), cert="valid")
    world.clock.now += 2
    retried = await sts.get_policy(DOMAIN)
    assert (retried.source, mode_of(retried), retried.txt_id) == ("fetched", "testing", "B")


async def test_sts_59_new_id_replaces_even_with_weaker_policy(world: World) -> None:
    """STS-59: id changes to B and the fetch succeeds -> the testing policy replaces enforce, the
    cache stores id B and a fresh expiry from the new max_age."""
    world.txt("v=STSv1; id=A")
    world.serve()
    sts = world.service()
    await sts.get_policy(DOMAIN)
    world.txt("v=STSv1; id=B")
    world.serve(policy_text(mode="testing", max_age=7200))
    world.clock.now += 100
    result = await sts.get_policy(DOMAIN)
    assert (result.source, mode_of(result), result.txt_id) == ("fetched", "testing", "B")
    entry = await sts.cache.get(DOMAIN)
    assert entry is not None and (entry.txt_id, entry.expires_at) == ("B", T0 + 100 + 7200)


async def test_sts_60_expired_cache_refetched_with_same_id(world: World) -> None:
    """STS-60: an expired cache is not applied; same id -> new fetch; if that fails -> no policy (STS-37)."""
    world.txt("v=STSv1; id=A")
    world.serve(policy_text(max_age=600))
    sts = world.service()
    await sts.get_policy(DOMAIN)
    world.clock.now += 601
    refreshed = await sts.get_policy(DOMAIN)
    assert (refreshed.source, world.fetches) == ("fetched", 2)
    world.serve(status=503)
    world.clock.now += 601
    failed = await sts.get_policy(DOMAIN)
    assert (failed.policy, failed.source) == (None, "none")
    assert failed.failure is not None and failed.failure.result_type == "sts-policy-fetch-error"


async def test_sts_63_max_age_zero_applies_once(world: World) -> None:
    """STS-63 [DECISION]: max_age 0 applies to the current attempt; the next lookup fetches again."""
    world.txt("v=STSv1; id=A")
    world.serve(policy_text(max_age=0))
    sts = world.service()
    assert mode_of(await sts.get_policy(DOMAIN)) == "enforce"
    assert mode_of(await sts.get_policy(DOMAIN)) == "enforce"
    assert world.fetches == 2


async def test_sts_64_restart_uses_persistent_cache(world: World) -> None:
    """STS-64: a new service on the same cache file applies the cached policy with no new fetch,
    expiring by the original fetch time."""
    world.txt("v=STSv1; id=A")
    world.serve()
    first = world.service()
    await first.get_policy(DOMAIN)
    await first.cache.close()
    world.clock.now += 3600
    second = world.service()
    result = await second.get_policy(DOMAIN)
    assert (result.source, mode_of(result)) == ("cache", "enforce")
    assert world.fetches == 1
    world.dns.zone.remove(TXT_NAME)
    world.clock.now = T0 + DAY + 1
    assert (await second.get_policy(DOMAIN)).policy is None


async def test_sts_65_mode_none_cached_and_failures_not_reported(world: World) -> None:
    """STS-65: a mode none policy is cached like any other; a later fetch failure while it is in
    force is not reported."""
    world.txt("v=STSv1; id=A")
    world.serve(policy_text(mode="none", mx=""))
    sts = world.service()
    assert mode_of(await sts.get_policy(DOMAIN)) == "none"
    assert (await sts.get_policy(DOMAIN)).source == "cache"
    world.txt("v=STSv1; id=B")
    world.serve(status=500)
    result = await sts.get_policy(DOMAIN)
    assert (mode_of(result), result.source, result.failure) == ("none", "cache", None)


async def test_sts_36_failed_fetch_backs_off_per_id(world: World) -> None:
    """STS-36: TXT valid, HTTPS 500; 10 lookups within a minute -> 1 request (STS-37: each is
    "no policy"); a new TXT id lifts the back-off at once."""
    world.txt("v=STSv1; id=A")
    world.serve(status=500)
    sts = world.service()
    results = []
    for _ in range(10):
        results.append(await sts.get_policy(DOMAIN))
        world.clock.now += 6
    assert world.fetches == 1
    assert all(r.policy is None for r in results)
    assert results[0].failure is not None and results[0].failure.result_type == "sts-policy-fetch-error"
    world.txt("v=STSv1; id=B")
    await sts.get_policy(DOMAIN)
    assert world.fetches == 2


async def test_sts_88_concurrent_lookups_share_one_fetch(world: World) -> None:
    """STS-88: concurrent lookups for one domain share one in-flight discovery: one request."""
    world.txt("v=STSv1; id=A")
    world.serve(drip=0.003)  # slow enough that all callers overlap
    sts = world.service()
    results = await asyncio.gather(*(sts.get_policy(DOMAIN) for _ in range(10)))
    assert world.fetches == 1
    assert {(r.source, mode_of(r)) for r in results} == {("fetched", "enforce")}


async def test_sts_88_one_cancelled_caller_does_not_cancel_the_others(world: World) -> None:
    """STS-88: a caller giving up does not abort the shared discovery for the others."""
    world.txt("v=STSv1; id=A")
    world.serve(drip=0.003)
    sts = world.service()
    quitter = asyncio.create_task(sts.get_policy(DOMAIN))
    stayer = asyncio.create_task(sts.get_policy(DOMAIN))
    await asyncio.sleep(0.05)
    quitter.cancel()
    result = await stayer
    assert (result.source, mode_of(result)) == ("fetched", "enforce")
    assert world.fetches == 1


async def test_sts_82_recheck_picks_up_new_policy(world: World) -> None:
    """STS-82/83: recheck re-queries TXT; a changed id fetches and applies the new policy."""
    world.txt("v=STSv1; id=A")
    world.serve()
    sts = world.service()
    await sts.get_policy(DOMAIN)
    world.txt("v=STSv1; id=B")
    world.serve(policy_text(mx="mx2.example.test"))
    result = await sts.recheck(DOMAIN)
    assert result.txt_id == "B" and result.policy is not None and result.policy.mx == ("mx2.example.test",)


async def test_sts_4_address_literal_no_lookup(world: World) -> None:
    """STS-4: an address literal gets no MTA-STS lookup at all (O-DNS shows no query)."""
    result = await world.service().get_policy("[192.0.2.1]")
    assert (result.policy, result.source) == (None, "none")
    assert world.dns.queries == []


async def test_sts_overrides_none_and_policy(world: World) -> None:
    """Configured overrides: "none" -> no policy, a Policy -> that policy; no discovery either way."""
    forced = Policy("enforce", ("mx.forced.test",), 86400)
    sts = world.service(overrides={"Off.Test": "none", "forced.test": forced})
    off = await sts.get_policy("off.test")
    on = await sts.get_policy("forced.test")
    assert (off.policy, off.source) == (None, "override")
    assert (on.policy, on.source) == (forced, "override")
    assert world.dns.queries == []


async def test_sts_service_returns_fresh_policy_when_cache_unwritable(world: World) -> None:
    """The fresh policy is returned even when the cache cannot store it (failure only logged)."""
    blocker = world.tmp / "file"
    blocker.write_text("x")
    world.txt("v=STSv1; id=A")
    world.serve()
    result = await world.service(cache_path=blocker / "sts.db").get_policy(DOMAIN)
    assert (result.source, mode_of(result)) == ("fetched", "enforce")


# ----- proactive refresh (STS-61/62) ------------------------------------------------------------


async def test_sts_61_refresh_once_refetches_before_expiry(world: World) -> None:
    """STS-61: max_age 2 days, clock +1 day -> refresh_once fetches again without any mail and
    resets fetched_at/expiry."""
    world.txt("v=STSv1; id=A")
    world.serve(policy_text(max_age=2 * 86400))
    sts = world.service()
    await sts.get_policy(DOMAIN)
    world.clock.now = T0 + DAY
    results = await sts.refresh_once(world.clock.now)
    assert [r.source for r in results] == ["fetched"]
    assert world.fetches == 2
    entry = await sts.cache.get(DOMAIN)
    assert entry is not None and (entry.fetched_at, entry.expires_at) == (T0 + DAY, T0 + 3 * DAY)
    assert await sts.refresh_once(world.clock.now + 60) == []  # just refreshed: not due


async def test_sts_61_refresh_skips_unused_and_not_yet_due(world: World) -> None:
    """STS-61: entries not yet in their refresh window, or for domains mail never went to, are left alone."""
    world.txt("v=STSv1; id=A")
    world.serve(policy_text(max_age=2 * 86400))
    sts = world.service()
    await sts.get_policy(DOMAIN)
    assert await sts.refresh_once(T0 + 3600) == []  # before half of the day horizon
    other = world.service(cache_path=world.tmp / "other.db")
    entry = await sts.cache.get(DOMAIN)
    assert entry is not None
    await other.cache.put(entry)  # cached, but never used for mail by this relay
    assert await other.refresh_once(T0 + DAY) == []
    assert world.fetches == 1


async def test_sts_62_failed_refresh_warns_unless_mode_none(world: World, caplog: pytest.LogCaptureFixture) -> None:
    """STS-62: a failed proactive refresh logs a warning and keeps the cached policy; for a cached
    mode none policy it stays quiet (STS-65)."""
    world.txt("v=STSv1; id=A")
    world.serve(policy_text(max_age=2 * 86400))
    sts = world.service()
    await sts.get_policy(DOMAIN)
    world.serve(status=500)
    with caplog.at_level(logging.WARNING, logger="mta.sts.service"):
        [result] = await sts.refresh_once(T0 + DAY)
    assert (result.source, mode_of(result)) == ("cache", "enforce")
    assert any("refresh" in r.getMessage() and DOMAIN in r.getMessage() for r in caplog.records)

    caplog.clear()
    world.clock.now = T0 + 3 * DAY  # expired: next lookup fetches the none policy
    world.serve(policy_text(mode="none", mx="", max_age=2 * 86400))
    assert mode_of(await sts.get_policy(DOMAIN)) == "none"
    world.serve(status=500)
    with caplog.at_level(logging.WARNING, logger="mta.sts.service"):
        [quiet] = await sts.refresh_once(world.clock.now + DAY)
    assert mode_of(quiet) == "none"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_sts_61_refresh_loop_stops_on_event(world: World) -> None:
    """STS-61: refresh_loop runs a pass at once and returns promptly when asked to stop."""
    world.txt("v=STSv1; id=A")
    world.serve(policy_text(max_age=2 * 86400))
    sts = world.service()
    await sts.get_policy(DOMAIN)
    world.clock.now = T0 + DAY
    stop = asyncio.Event()
    task = asyncio.create_task(sts.refresh_loop(stop, interval=3600))
    for _ in range(100):
        if world.fetches == 2:
            break
        await asyncio.sleep(0.02)
    stop.set()
    await asyncio.wait_for(task, 2)
    assert world.fetches == 2


# ----- draft-03 compatibility (SEED-S1/S2) ---------------------------------------------------------

DRAFT_JSON = '{"version": "STSv1", "mode": "report", "mx": ["mx1.example.test"], "max_age": 3600}'


def serve_draft(world: World) -> None:
    world.dns.zone.add(HOST, "TXT", '"v=STSv1; id=d1"')
    world.server.set(HOST, JSON_PATH, body=DRAFT_JSON, content_type="application/json")


async def test_seed_s1_draft_ignored_without_flag(world: World) -> None:
    """SEED-S1: with the compat flag off the draft record is never even queried."""
    serve_draft(world)
    result = await world.service().get_policy(DOMAIN)
    assert result.policy is None
    assert world.dns.count(HOST, "TXT") == 0 and world.fetches == 0


async def test_seed_s2_draft_used_when_no_rfc_record(world: World) -> None:
    """SEED-S2/S5: flag on, no RFC record -> draft record + JSON policy, dialect draft03, cached."""
    serve_draft(world)
    sts = world.service(draft03_compat=True)
    result = await sts.get_policy(DOMAIN)
    assert (result.source, mode_of(result), result.txt_id) == ("fetched", "testing", "d1")
    assert result.policy is not None and result.policy.dialect == "draft03"
    assert [r.path for r in world.server.requests] == [JSON_PATH]
    again = await sts.get_policy(DOMAIN)
    assert again.source == "cache" and world.fetches == 1


async def test_seed_s2_rfc_policy_wins(world: World) -> None:
    """SEED-S2: with both records published the RFC one is used and the draft never consulted;
    a draft policy then never replaces the cached RFC policy."""
    serve_draft(world)
    world.txt("v=STSv1; id=A")
    world.serve()
    sts = world.service(draft03_compat=True)
    result = await sts.get_policy(DOMAIN)
    assert (mode_of(result), result.policy.dialect if result.policy else None) == ("enforce", "rfc8461")
    world.dns.zone.remove(TXT_NAME)  # RFC record gone, cached RFC policy still fresh
    later = await sts.get_policy(DOMAIN)
    assert (later.source, mode_of(later)) == ("cache", "enforce")
    assert [r.path for r in world.server.requests] == [TXT_PATH]
    assert world.dns.count(HOST, "TXT") == 0
