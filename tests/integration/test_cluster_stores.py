"""The cluster's PostgreSQL stores in-process, on a real PostgreSQL (issue 15): schema, CAS, counts, claims."""

from __future__ import annotations

import asyncio
import datetime
import time

import psycopg
import pytest

from mta.cluster.db import SCHEMA_VERSION, ClusterDb, SchemaTooNew, redact
from mta.cluster.policies import PgPolicyCache
from mta.cluster.tlsrpt import PgResultStore
from mta.sts.decide import CacheEntry
from mta.sts.policy import parse_policy
from tests.support.postgres import PostgresServer

pytestmark = pytest.mark.timeout(30, func_only=True)  # the session's PostgreSQL starts in a setup


def entry(domain: str, fetched: float, mode: str = "enforce", txt_id: str = "1") -> CacheEntry:
    policy = parse_policy(f"version: STSv1\nmode: {mode}\nmx: mx.{domain}\nmax_age: 86400\n".encode())
    return CacheEntry(domain=domain, txt_id=txt_id, policy=policy, fetched_at=fetched, expires_at=fetched + 86400)


async def started(url: str, node: str, **kw: float) -> ClusterDb:
    db = ClusterDb(url, node, **kw)
    assert await db.start(), db.reason
    return db


@pytest.mark.req("CLU-8")
async def test_clu_8_nodes_starting_together_migrate_once(pg_url: str) -> None:
    dbs = [ClusterDb(pg_url, f"n{i}") for i in range(6)]
    assert all(await asyncio.gather(*(db.start() for db in dbs)))
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT version FROM mta_schema").fetchall() == [(SCHEMA_VERSION,)]
    await asyncio.gather(*(db.close() for db in dbs))


@pytest.mark.req("CLU-8")
async def test_clu_8_schema_of_a_newer_mta_is_refused_in_one_line(pg_url: str) -> None:
    await (await started(pg_url, "n1")).close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE mta_schema SET version = 99")
    with pytest.raises(SchemaTooNew) as info:
        await ClusterDb(pg_url, "n1").start()
    assert "\n" not in str(info.value) and "99" in str(info.value) and "newer mta" in str(info.value)


def test_clu_5_password_never_shown() -> None:
    assert "s3cret" not in redact("postgresql://mta:s3cret@db:5432/mta")
    assert "s3cret" not in redact("postgresql://db/mta?password=s3cret&sslmode=require")
    assert redact("postgresql://mta@db/mta") == "postgresql://mta@db/mta"


@pytest.mark.req("CLU-1", "CLU-2")
async def test_clu_2_newer_policy_is_never_replaced_by_an_older_one_whichever_node_writes(pg_url: str) -> None:
    a, b = await started(pg_url, "a"), await started(pg_url, "b")
    ca, cb = PgPolicyCache(a), PgPolicyCache(b)
    now = time.time()
    assert await ca.put(entry("x.test", now, txt_id="new"))
    await ca.sync_once()
    # b has not seen it yet and stores an older fetch: memory takes it, the database does not.
    assert await cb.put(entry("x.test", now - 100, mode="testing", txt_id="old"))
    await cb.sync_once()
    got = await cb.get("x.test")
    assert got is not None and got.txt_id == "new"  # and b adopts the newer one (CLU-1)
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT txt_id FROM mta_sts_policies").fetchall() == [("new",)]
    # A later fetch on b replaces it everywhere.
    assert await cb.put(entry("x.test", now + 5, txt_id="newer"))
    await cb.sync_once()
    await ca.sync_once()
    assert (await ca.get("x.test")).txt_id == "newer"  # type: ignore[union-attr]
    # A failure mark from a's stale snapshot (compare-and-set on what a decided from) is refused.
    stale = entry("x.test", now, txt_id="new")
    assert not await ca.put(CacheEntry(**{**stale.__dict__, "failed_id": "new", "failed_at": now + 6}), stale)
    await a.close()
    await b.close()


@pytest.mark.req("CLU-2")
async def test_clu_2_damaged_row_is_reported_and_not_applied(pg_url: str) -> None:
    db = await started(pg_url, "a")
    cache = PgPolicyCache(db)
    await cache.put(entry("d.test", time.time()))
    await cache.sync_once()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE mta_sts_policies SET policy_text = 'garbage', rev = nextval('mta_sts_policies_rev_seq')")
    other = PgPolicyCache(db)
    await other.load()
    assert await other.get("d.test") is None
    assert "unreadable" in (other.damage("d.test") or "")
    await db.close()


@pytest.mark.req("CLU-3")
async def test_clu_3_one_claim_per_day_and_domain_and_a_lease_for_dead_claimers(pg_url: str) -> None:
    nodes = [await started(pg_url, f"n{i}") for i in range(3)]
    stores = [PgResultStore(db, lease=1.0) for db in nodes]
    day = datetime.date(2026, 12, 1)
    wins = await asyncio.gather(*(s.claim(day, "x.test", f"r{i}") for i, s in enumerate(stores)))
    assert sorted(wins) == [False, False, True]
    winner = wins.index(True)
    assert set(await stores[winner].sent(day)) == {"x.test"}
    # The winner "dies" (never finishes); after the lease another node may send, once.
    await asyncio.sleep(1.3)
    assert await stores[(winner + 1) % 3].sent(day) == {}
    again = await asyncio.gather(*(s.claim(day, "x.test", f"s{i}") for i, s in enumerate(stores)))
    assert sorted(again) == [False, False, True]
    second = again.index(True)
    await stores[second].finish(day, "x.test", "sent", "ok", f"s{second}")
    await stores[winner].finish(day, "x.test", "failed", "late", f"r{winner}")  # the old claim cannot overwrite
    await asyncio.sleep(1.3)
    row = (await stores[0].sent(day))["x.test"]
    assert (row.status, row.report_id) == ("sent", f"s{second}")
    assert not any(await asyncio.gather(*(s.claim(day, "x.test", "t") for s in stores)))
    for db in nodes:
        await db.close()


def _record(store: PgResultStore, n: int, domain: str = "x.test") -> None:
    policy = parse_policy(b"version: STSv1\nmode: enforce\nmx: mx.x.test\nmax_age: 86400\n")
    for i in range(n):
        store.record(policy_domain=domain, policy=policy, success=i % 2 == 0,
                     result_type=None if i % 2 == 0 else "certificate-expired", mx_host="mx.x.test",
                     receiving_ip="127.0.0.9")


async def _totals(store: PgResultStore) -> tuple[int, int]:
    summaries = await store.summaries(datetime.datetime.now(datetime.UTC).date())
    return (sum(p.successful for p in summaries["x.test"]), sum(p.failed for p in summaries["x.test"]))


@pytest.mark.req("CLU-6")
async def test_clu_6_counts_survive_a_database_restart_once(own_pg: PostgresServer) -> None:
    url = own_pg.start().create_database()
    db = await started(url, "n1", retry_interval=0.3, op_timeout=2.0)
    store = PgResultStore(db)
    _record(store, 10)
    await store.flush()
    own_pg.stop()
    _record(store, 6)
    with pytest.raises(Exception):  # noqa: B017 - DatabaseUnavailable (or the error that revealed it)
        await store.flush()
    _record(store, 4)
    assert store.pending() == 10
    assert not db.available
    own_pg.start()
    for _ in range(100):
        if db.available:
            break
        await asyncio.sleep(0.1)
    assert db.available, db.reason
    await store.flush()
    assert store.pending() == 0
    assert await _totals(store) == (10, 10)
    await db.close()


@pytest.mark.req("CLU-6")
async def test_clu_6_a_batch_whose_commit_outcome_was_lost_is_not_counted_twice(pg_url: str) -> None:
    db = await started(pg_url, "n1")
    store = PgResultStore(db)
    _record(store, 4)
    batch = ("n1.test.1", store._sessions, store._failures)
    await db.run(lambda conn: store._apply(conn, batch))
    await db.run(lambda conn: store._apply(conn, batch))  # the retry after a lost COMMIT reply
    assert await _totals(store) == (2, 2)
    await db.close()


@pytest.mark.req("CLU-3", "RPT-21")
async def test_clu_3_https_retries_are_taken_by_one_node_and_return_after_the_lease(pg_url: str) -> None:
    from mta.tlsrpt.retry import PendingPost

    a, b = await started(pg_url, "a"), await started(pg_url, "b")
    sa, sb = PgResultStore(a, lease=1.0), PgResultStore(b, lease=1.0)
    day = datetime.date(2026, 12, 1)
    now = time.time()
    post = PendingPost(day, "x.test", "https://rua.x.test/r", "rid", b"\x1f\x8bgz", now - 60, 1, now - 1, "HTTP 503")
    await sa.add_retries([post, PendingPost(**{**post.__dict__, "url": "https://two.x.test/r"})])
    taken = await asyncio.gather(sa.due_retries(now), sb.due_retries(now))
    assert sorted(len(t) for t in taken) == [0, 2]  # one node takes both, the other none
    [got, _] = next(t for t in taken if t)
    assert (got.body, got.tries, got.report_id) == (b"\x1f\x8bgz", 1, "rid")
    assert await sb.due_retries(now + 0.5) == []
    assert len(await sb.due_retries(now + 1.5)) == 2  # the taker died: due again after the lease
    assert await sa.drop_retry(day, "x.test", "https://rua.x.test/r") == 1
    assert await sa.drop_retry(day, "x.test") == 0
    await a.close()
    await b.close()
