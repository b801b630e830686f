"""Downgrade windows of policy discovery (issue 10 items 1-3, SEED-S2/S6): a DNS or HTTPS attacker,
a race or a damaged cache file must never turn a cached policy off (RFC 8461 §5.1, §10.2).

Real DNS (FakeDns), HTTPS policy host and SQLite cache; time is the injected clock and races are
driven by a gate the test opens, never by sleeping.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3

import pytest

from mta.sts.cache import PolicyCache
from mta.sts.decide import CacheEntry
from mta.sts.policy import Policy
from tests.integration.test_sts_service import (
    DAY,
    DOMAIN,
    HOST,
    T0,
    TXT_NAME,
    World,
    mode_of,
    policy_text,
)
from tests.support.policy_server import JSON_PATH

DRAFT_ENFORCE = '{"version": "STSv1", "mode": "enforce", "mx": ["mx1.example.test"], "max_age": 86400}'


@pytest.fixture
def world(sts_world: World) -> World:
    return sts_world


def serve_draft(world: World, body: str = DRAFT_ENFORCE, txt_id: str = "d1") -> None:
    world.dns.zone.remove(HOST, "TXT")
    world.dns.zone.add(HOST, "TXT", f'"v=STSv1; id={txt_id}"')
    world.server.set(HOST, JSON_PATH, body=body, content_type="application/json")


# ----- item 1: draft-03 compat must not lose a fresh cached policy ------------------------------


@pytest.mark.parametrize("failure", [{"status": 404}, {"cert": "untrusted"}], ids=["404", "webpki"])
async def test_issue10_item1_seed_s2_rfc_record_with_failed_fetch_keeps_cached_draft_enforce(
    world: World, failure: dict[str, object]
) -> None:
    """Issue 10 item 1 / issue 11 §2: a fresh cached draft-03 enforce policy, then an RFC record
    appears whose fetch fails -> the draft policy still applies (it is replaced only by a
    successful authenticated fetch), the failure is reported, and nothing is downgraded."""
    serve_draft(world)
    sts = world.service(draft03_compat=True)
    first = await sts.get_policy(DOMAIN)
    assert (first.source, mode_of(first), first.policy and first.policy.dialect) == ("fetched", "enforce", "draft03")
    world.txt("v=STSv1; id=R1")  # the attacker (or a half-done migration) publishes an RFC record
    failure = dict(failure)
    cert = failure.pop("cert", None)
    world.server.policy(DOMAIN, policy_text("none"), cert=cert, **failure)  # type: ignore[arg-type]
    world.clock.now += 3600
    for _ in range(2):  # the second lookup is inside the fetch back-off (STS-36): same answer
        later = await sts.get_policy(DOMAIN)
        assert (later.source, mode_of(later), later.txt_id) == ("cache", "enforce", "d1"), later
        assert later.policy is not None and later.policy.dialect == "draft03"
    entry = await sts.cache.get(DOMAIN)
    assert entry is not None and entry.policy.dialect == "draft03" and entry.txt_id == "d1"


@pytest.mark.req("SEED-S2", "STS-91")
async def test_issue10_item1_reports_fetch_failure_and_successful_rfc_fetch_replaces_draft(world: World) -> None:
    """Issue 10 item 1: the failed RFC fetch is reported (STS-91) while the draft policy applies;
    once the RFC policy can be fetched it replaces the draft one (SEED-S2: RFC wins)."""
    serve_draft(world)
    sts = world.service(draft03_compat=True)
    await sts.get_policy(DOMAIN)
    world.txt("v=STSv1; id=R1")
    world.serve(policy_text("testing"), status=500)
    failed = await sts.get_policy(DOMAIN)
    assert mode_of(failed) == "enforce" and failed.failure is not None
    assert failed.failure.result_type == "sts-policy-fetch-error"
    world.txt("v=STSv1; id=R2")  # a new id lifts the back-off
    world.serve(policy_text("testing"))
    replaced = await sts.get_policy(DOMAIN)
    assert (replaced.source, mode_of(replaced), replaced.txt_id) == ("fetched", "testing", "R2")
    assert replaced.policy is not None and replaced.policy.dialect == "rfc8461"
    entry = await sts.cache.get(DOMAIN)  # the RFC policy replaced the draft one in the cache too
    assert entry is not None and (entry.txt_id, entry.policy.dialect) == ("R2", "rfc8461")


@pytest.mark.req("SEED-S2", "STS-60")
async def test_issue10_item1_expired_draft_policy_is_not_applied(world: World) -> None:
    """Issue 10 item 1 (the other side): only a FRESH cached draft policy is kept (STS-60)."""
    serve_draft(world)
    sts = world.service(draft03_compat=True)
    await sts.get_policy(DOMAIN)
    world.txt("v=STSv1; id=R1")
    world.serve(status=404)
    world.clock.now += DAY + 1
    result = await sts.get_policy(DOMAIN)
    assert (result.policy, result.source) == (None, "none")


async def test_seed_s6_draft_record_behind_cname_is_logged(world: World, caplog: pytest.LogCaptureFixture) -> None:
    """SEED-S6: a draft record found only through a CNAME at mta-sts.<domain> (usually the
    policy host's provider) is used under the draft rules but logged as suspicious."""
    world.dns.zone.add(HOST, "CNAME", "hosting.provider.test.")
    world.dns.zone.add("hosting.provider.test", "TXT", '"v=STSv1; id=p1"')
    world.dns.zone.add("hosting.provider.test", "A", "127.0.0.5")
    world.server.set(HOST, JSON_PATH, body=DRAFT_ENFORCE, content_type="application/json")
    sts = world.service(draft03_compat=True)
    with caplog.at_level(logging.WARNING, logger="mta.sts.service"):
        await sts.get_policy(DOMAIN)
    [rec] = [r for r in caplog.records if "SEED-S6" in r.getMessage()]
    assert "mta-sts.example.test" in rec.getMessage() and "hosting.provider.test" in rec.getMessage()


async def test_seed_s6_draft_record_without_cname_is_not_flagged(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """SEED-S6: a draft record at mta-sts.<domain> itself raises no suspicion."""
    serve_draft(world)
    with caplog.at_level(logging.WARNING, logger="mta.sts.service"):
        result = await world.service(draft03_compat=True).get_policy(DOMAIN)
    assert mode_of(result) == "enforce"
    assert not [r for r in caplog.records if "SEED-S6" in r.getMessage()]


# ----- item 2: the background refresh never rolls back a newer policy -------------------------


class Gate(asyncio.Semaphore):
    """A closed gate: says when someone waits at it; opens when the test calls release()."""

    def __init__(self) -> None:
        super().__init__(0)
        self.waiting = asyncio.Event()

    async def acquire(self) -> bool:
        self.waiting.set()
        return await super().acquire()


@pytest.mark.req("STS-61")
async def test_issue10_item2_refresh_with_stale_snapshot_does_not_roll_back(world: World) -> None:
    """Issue 10 item 2: the refresh takes its snapshot (policy A), waits at its gate; meanwhile a
    normal discovery stores policy B; then the refresh's fetch fails. Policy B must stay, in
    memory and on disk."""
    world.txt("v=STSv1; id=A")
    world.serve(policy_text("testing", max_age=2 * 86400))
    sts = world.service()
    await sts.get_policy(DOMAIN)
    world.clock.now = T0 + DAY  # the refresh point (at most 1 day after the fetch) has come
    gate = Gate()
    refresh = asyncio.create_task(sts.refresh_once(gate=gate))
    await asyncio.wait_for(gate.waiting.wait(), 5)  # snapshot of A taken, refresh parked at the gate
    world.txt("v=STSv1; id=B")
    world.serve(policy_text("enforce", max_age=2 * 86400))
    newer = await sts.get_policy(DOMAIN)
    assert (newer.source, newer.txt_id, mode_of(newer)) == ("fetched", "B", "enforce")
    world.serve(status=500)  # the refresh's fetch will fail
    gate.release()
    await asyncio.wait_for(refresh, 10)
    entry = await sts.cache.get(DOMAIN)
    assert entry is not None and (entry.txt_id, entry.policy.mode) == ("B", "enforce")
    world.dns.zone.remove(TXT_NAME)  # no live record: what the cache says is what applies
    after = await sts.get_policy(DOMAIN)
    assert (after.txt_id, mode_of(after)) == ("B", "enforce")
    reopened = PolicyCache(world.tmp / "sts.db")
    try:
        on_disk = await reopened.get(DOMAIN)
    finally:
        await reopened.close()
    assert on_disk is not None and (on_disk.txt_id, on_disk.policy.mode) == ("B", "enforce")


ENFORCE = Policy("enforce", ("mx1.example.test",), 86400)
TESTING = Policy("testing", ("mx1.example.test",), 86400)


@pytest.mark.req("STS-59", "STS-64")
async def test_issue10_item2_cache_put_is_compare_and_set_in_memory(world: World) -> None:
    """Issue 10 item 2: a write decided from an old snapshot is refused; the newer entry stays."""
    cache = PolicyCache(world.tmp / "cas.db")
    world.caches.append(cache)
    old = CacheEntry(DOMAIN, "A", TESTING, T0, T0 + DAY)
    new = CacheEntry(DOMAIN, "B", ENFORCE, T0 + 10, T0 + 10 + DAY)
    assert await cache.put(old, None)
    assert await cache.put(new, old)
    stale_mark = CacheEntry(DOMAIN, "A", TESTING, T0, T0 + DAY, failed_id="C", failed_at=T0 + 20)
    assert not await cache.put(stale_mark, old)  # snapshot `old` is no longer current
    assert await cache.get(DOMAIN) == new
    marked = CacheEntry(DOMAIN, "B", ENFORCE, T0 + 10, T0 + 10 + DAY, failed_id="C", failed_at=T0 + 20)
    assert await cache.put(marked, new)  # decided from the current entry: goes ahead
    assert await cache.get(DOMAIN) == marked


@pytest.mark.req("STS-64")
async def test_issue10_item2_sqlite_keeps_a_newer_row_written_elsewhere(world: World) -> None:
    """Issue 10 item 2, on disk: a process holding an old entry never overwrites the newer row
    another process (or cache instance) stored in the same file."""
    path = world.tmp / "shared.db"
    first, second = PolicyCache(path), PolicyCache(path)
    world.caches += [first, second]
    old = CacheEntry(DOMAIN, "A", TESTING, T0, T0 + DAY)
    await first.put(old, None)
    assert await second.get(DOMAIN) == old  # `second` loaded A
    await first.put(CacheEntry(DOMAIN, "B", ENFORCE, T0 + 10, T0 + 10 + DAY), old)
    stale_mark = CacheEntry(DOMAIN, "A", TESTING, T0, T0 + DAY, failed_id="C", failed_at=T0 + 20)
    await second.put(stale_mark, old)  # current in `second`'s memory, but not on disk any more
    third = PolicyCache(path)
    world.caches.append(third)
    on_disk = await third.get(DOMAIN)
    assert on_disk is not None and (on_disk.txt_id, on_disk.policy.mode) == ("B", "enforce")


# ----- item 3: cache damage fails closed ---------------------------------------------------------


def errors(caplog: pytest.LogCaptureFixture, needle: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR and needle in r.getMessage()]


@pytest.mark.req("STS-64", "STS-57")
async def test_issue10_item3_unreadable_database_keeps_fetched_policy_in_memory(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 10 item 3: with a cache file that cannot be read, a fetched enforce policy still
    stays in force from memory when the TXT record then disappears (STS-57), and every lookup
    logs the damage as an error."""
    path = world.tmp / "damaged.db"
    path.write_bytes(b"this is not an SQLite database" * 100)
    world.txt("v=STSv1; id=A")
    world.serve()
    sts = world.service(cache_path=path)
    with caplog.at_level(logging.ERROR):
        first = await sts.get_policy(DOMAIN)
        assert (first.source, mode_of(first)) == ("fetched", "enforce")
        world.dns.zone.remove(TXT_NAME)
        world.clock.now += 60
        second = await sts.get_policy(DOMAIN)
        third = await sts.get_policy(DOMAIN)
    assert (second.source, mode_of(second)) == ("cache", "enforce")
    assert (third.source, mode_of(third)) == ("cache", "enforce")
    assert len(errors(caplog, "policy cache")) >= 3  # each lookup that consulted the cache


@pytest.mark.req("STS-64")
async def test_issue10_item3_damaged_row_is_an_error_on_every_lookup(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 10 item 3: a row that no longer parses is reported as an error naming the domain
    each time the domain is looked up (never a silent downgrade), until a fetch replaces it."""
    path = world.tmp / "sts.db"
    cache = PolicyCache(path)
    await cache.put(CacheEntry(DOMAIN, "A", ENFORCE, T0, T0 + DAY))
    await cache.close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE policies SET policy_text = 'mode: sometimes' WHERE domain = ?", (DOMAIN,))
    conn.close()
    sts = world.service(cache_path=path)
    with caplog.at_level(logging.ERROR):
        for _ in range(2):
            await sts.get_policy(DOMAIN)  # no TXT record: nothing can replace the damaged row
    assert len(errors(caplog, f"stored policy of {DOMAIN} is unreadable")) == 2
    assert DOMAIN in sts.cache.damaged()  # type: ignore[attr-defined]
    caplog.clear()
    world.txt("v=STSv1; id=B")
    world.serve()
    with caplog.at_level(logging.ERROR):
        fixed = await sts.get_policy(DOMAIN)
        again = await sts.get_policy(DOMAIN)
    assert (fixed.source, again.source, mode_of(again)) == ("fetched", "cache", "enforce")
    assert sts.cache.damaged() == {}  # type: ignore[attr-defined]
    assert len(errors(caplog, "unreadable")) == 1  # only the lookup before the fetch replaced it


@pytest.mark.req("STS-64")
async def test_issue10_item3_write_failure_is_an_error_and_memory_keeps_applying(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 10 item 3: the database breaks while the relay runs -> the write failure is logged
    as an error and the in-memory policy keeps applying."""
    world.txt("v=STSv1; id=A")
    world.serve()
    sts = world.service()
    await sts.get_policy(DOMAIN)
    await sts.cache.close()  # from now on every database access fails
    world.txt("v=STSv1; id=B")
    world.serve(policy_text("enforce", mx="mx2.example.test"))
    with caplog.at_level(logging.ERROR):
        fetched = await sts.get_policy(DOMAIN)
    assert (fetched.source, fetched.txt_id) == ("fetched", "B")
    assert errors(caplog, "could not store the MTA-STS policy")
    world.dns.zone.remove(TXT_NAME)
    kept = await sts.get_policy(DOMAIN)
    assert (kept.source, kept.txt_id, mode_of(kept)) == ("cache", "B", "enforce")
