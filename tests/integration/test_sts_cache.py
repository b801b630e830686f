"""The persistent policy cache (mta.sts.cache) against a real SQLite file (STS-55, STS-59, STS-64)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from mta.sts.cache import CacheError, PolicyCache
from mta.sts.decide import CacheEntry
from mta.sts.policy import Policy

ENFORCE = Policy("enforce", ("mx1.example.com", "*.example.net"), 86400)
T0 = 1_800_000_000.0


def entry(domain: str = "example.com", txt_id: str = "A", policy: Policy = ENFORCE, at: float = T0) -> CacheEntry:
    return CacheEntry(domain, txt_id, policy, at, at + policy.max_age)


async def test_sts_64_entry_survives_a_new_cache_instance(tmp_path: Path) -> None:
    """STS-64: what one instance stored, a fresh instance (a restarted relay) reads back unchanged,
    with the original fetched_at/expires_at (expiry counts from the fetch, not the restart)."""
    path = tmp_path / "sts.db"
    first = PolicyCache(path)
    stored = entry()
    await first.put(stored)
    await first.close()

    second = PolicyCache(path)
    try:
        got = await second.get("example.com")
        assert got == stored
        assert got is not None and got.expires_at == T0 + 86400
    finally:
        await second.close()


async def test_sts_64_failed_id_and_dialect_persist(tmp_path: Path) -> None:
    """STS-36/58 state (failed id and time) and the dialect (SEED-S5) are stored too."""
    path = tmp_path / "sts.db"
    draft = Policy("testing", ("mx.example.org",), 3600, dialect="draft03")
    first = PolicyCache(path)
    await first.put(CacheEntry("example.com", "A", ENFORCE, T0, T0 + 86400, failed_id="B", failed_at=T0 + 5))
    await first.put(entry("example.org", "d1", draft))
    await first.close()

    second = PolicyCache(path)
    try:
        com = await second.get("example.com")
        org = await second.get("example.org")
        assert com is not None and (com.failed_id, com.failed_at) == ("B", T0 + 5)
        assert org is not None and org.policy.dialect == "draft03" and org.policy == draft
    finally:
        await second.close()


async def test_sts_59_put_replaces_previous_entry(tmp_path: Path) -> None:
    """STS-59: a new id/policy replaces the old one (even a weaker mode), on disk as well."""
    path = tmp_path / "sts.db"
    cache = PolicyCache(path)
    await cache.put(entry(txt_id="A"))
    weaker = Policy("none", (), 600)
    await cache.put(entry(txt_id="B", policy=weaker, at=T0 + 100))
    assert [e.txt_id for e in await cache.all()] == ["B"]
    await cache.close()

    reopened = PolicyCache(path)
    try:
        got = await reopened.get("example.com")
        assert got is not None and got.txt_id == "B" and got.policy == weaker and got.fetched_at == T0 + 100
    finally:
        await reopened.close()


async def test_sts_64_concurrent_puts_leave_the_newest_on_disk(tmp_path: Path) -> None:
    """Overlapping writes (worker threads) must not leave an older entry on disk than in memory."""
    path = tmp_path / "sts.db"
    cache = PolicyCache(path)
    await asyncio.gather(*(cache.put(entry(txt_id=f"id{i}", at=T0 + i)) for i in range(20)))
    in_memory = await cache.get("example.com")
    await cache.close()
    reopened = PolicyCache(path)
    try:
        assert await reopened.get("example.com") == in_memory
        assert in_memory is not None and in_memory.txt_id == "id19"
    finally:
        await reopened.close()


async def test_sts_55_unknown_domain_is_none_and_all_sorted(tmp_path: Path) -> None:
    """A domain never stored has no entry; all() lists every entry by domain."""
    cache = PolicyCache(tmp_path / "sts.db")
    try:
        assert await cache.get("nothing.example") is None
        await cache.put(entry("b.example"))
        await cache.put(entry("a.example"))
        assert [e.domain for e in await cache.all()] == ["a.example", "b.example"]
        assert await cache.get("A.EXAMPLE") is not None  # domains compare case-insensitively
    finally:
        await cache.close()


async def test_sts_61_touch_records_last_use_persistently(tmp_path: Path) -> None:
    """STS-61 input: last use of a cached domain is kept across restarts (refresh only those)."""
    path = tmp_path / "sts.db"
    cache = PolicyCache(path)
    await cache.put(entry())
    await cache.touch("example.com", T0 + 10)
    assert cache.last_used("example.com") == T0 + 10
    await cache.close()
    reopened = PolicyCache(path)
    try:
        await reopened.all()
        assert reopened.last_used("example.com") == T0 + 10
        assert reopened.last_used("other.example") is None
    finally:
        await reopened.close()


async def test_sts_64_warm_get_needs_no_worker_thread(tmp_path: Path) -> None:
    """A warm lookup is a dict access: it completes without yielding to the loop (throughput)."""
    cache = PolicyCache(tmp_path / "sts.db")
    try:
        await cache.put(entry())
        coro = cache.get("example.com")
        with pytest.raises(StopIteration) as done:
            coro.send(None)  # finishes on the first step: no await on a thread
        assert done.value.value == entry()
    finally:
        await cache.close()


async def test_sts_64_unreadable_row_is_ignored(tmp_path: Path) -> None:
    """A row whose policy text no longer parses is skipped (warning), the rest still loads."""
    path = tmp_path / "sts.db"
    cache = PolicyCache(path)
    await cache.put(entry("good.example"))
    await cache.put(entry("bad.example"))
    await cache.close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE policies SET policy_text = 'garbage' WHERE domain = 'bad.example'")
    conn.close()
    reopened = PolicyCache(path)
    try:
        assert await reopened.get("bad.example") is None
        assert await reopened.get("good.example") is not None
    finally:
        await reopened.close()


async def test_sts_64_unwritable_path_raises_cache_error(tmp_path: Path) -> None:
    """A cache path that cannot be opened is a CacheError (the service logs it), not sqlite3's error."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cache = PolicyCache(blocker / "sts.db")  # parent is a regular file
    with pytest.raises(CacheError):
        await cache.get("example.com")
