"""MTA-STS policy discovery for one domain: TXT lookup, cache, HTTPS fetch (RFC 8461 §3, §5.1).

Rule: this module carries out what `sts.decide` says and decides nothing itself, except three
things decide leaves to I/O: concurrent lookups of one domain share one in-flight discovery
(STS-88); a fetch that failed without any cache entry to carry the failure is remembered in
memory for the back-off (STS-36); and the draft-03 dialect (SEED-S2) is consulted only when the
RFC record yields nothing usable and no fresh RFC policy is cached, so an RFC policy always wins.

A freshly fetched policy is returned even when storing it fails (the cache error is logged).
A discovery failure that TLS-RPT should report (STS-91: fetch error, invalid policy, web PKI)
is returned in `PolicyResult.failure`, except while the policy in force is `mode: none` (STS-65).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mta.errors import DnsError, DnsPermanentError, MtaError, StsError, StsRecordError
from mta.net.dns import Resolver, to_ascii
from mta.sts.cache import ANY, PolicyStore
from mta.sts.decide import (
    Action,
    CacheEntry,
    TxtOutcome,
    after_fetch_failure,
    after_fetch_success,
    backoff_active,
    decide,
    refresh_due,
)
from mta.sts.draft03 import DRAFT_TXT_LABEL, select_draft_txt
from mta.sts.fetch import fetch_policy
from mta.sts.policy import TXT_LABEL, Policy, StsRecord, parse_policy, select_txt_record

log = logging.getLogger(__name__)

RFC = "rfc8461"
DRAFT = "draft03"
RECENT_USE = 30 * 86400.0  # STS-61: only domains mail went to within this window are refreshed


@dataclass(frozen=True)
class PolicyResult:
    """The policy to apply to one domain now, and where it came from.

    source: "cache", "fetched", "override" or "none"; `failure` is a discovery failure to
    record for TLS-RPT (STS-91), None when there is nothing to report.
    """

    domain: str
    policy: Policy | None
    txt_id: str | None
    source: str
    reason: str
    failure: StsError | None = None


class StsService:
    """Finds the policy for a domain; one instance per relay (it holds the in-flight table)."""

    def __init__(
        self,
        *,
        resolver: Resolver,
        cache: PolicyStore,
        https_port: int = 443,
        ca_file: str | None = None,
        fetch_timeout: float = 60.0,
        draft03_compat: bool = False,
        overrides: Mapping[str, str | Policy] | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.resolver = resolver
        self.cache = cache
        self.https_port = https_port
        self.ca_file = ca_file
        self.fetch_timeout = fetch_timeout
        self.draft03_compat = draft03_compat
        self.clock = clock
        self.rng = rng or random.Random()
        self.overrides = {_normalise(d): _override_policy(v) for d, v in (overrides or {}).items()}
        self._inflight: dict[str, asyncio.Task[PolicyResult]] = {}
        # STS-36 without a cache entry to carry it: (dialect, domain) -> (failed id, when)
        self._failed: dict[tuple[str, str], tuple[str, float]] = {}

    # ----- lookups -------------------------------------------------------------------------

    async def get_policy(self, domain: str) -> PolicyResult:
        """The policy to apply for mail to `domain` now (RFC 8461 §5.1 step 1)."""
        if domain.startswith("["):
            return PolicyResult(domain, None, None, "none", "address-literal")  # STS-4: no lookup
        try:
            name = _normalise(domain)
        except (DnsError, UnicodeError, ValueError) as exc:
            return PolicyResult(domain, None, None, "none", f"invalid-domain: {exc}")
        if name in self.overrides:
            policy = self.overrides[name]
            return PolicyResult(name, policy, None, "override", "override")
        with contextlib.suppress(MtaError):  # last use only steers refresh; never fail mail over it
            await self.cache.touch(name, self.clock())
        return await self._shared(name, lambda: self._discover(name))

    async def recheck(self, domain: str) -> PolicyResult:
        """Discovery with a fresh TXT query, before a retry or a give-up (STS-82/83).

        get_policy already queries TXT every time (only the policy body is cached), so this
        is the same call; it exists so callers say what they mean.
        """
        return await self.get_policy(domain)

    async def _shared(self, name: str, make: Callable[[], Coroutine[Any, Any, PolicyResult]]) -> PolicyResult:
        """STS-88: every caller for one domain awaits the same discovery task."""
        task = self._inflight.get(name)
        if task is None:
            task = asyncio.create_task(make(), name=f"sts-discovery {name}")
            self._inflight[name] = task
            task.add_done_callback(lambda t: self._forget(name, t))
        # shield: one caller giving up (cancelled) must not cancel the others' discovery
        return await asyncio.shield(task)

    def _forget(self, name: str, task: asyncio.Task[PolicyResult]) -> None:
        if self._inflight.get(name) is task:
            del self._inflight[name]

    async def _discover(self, name: str) -> PolicyResult:
        now = self.clock()
        cached = await self._cached(name)
        rfc_cached = cached if cached is not None and cached.policy.dialect == RFC else None
        draft_cached = cached if cached is not None and cached.policy.dialect == DRAFT else None
        txt = await self._txt(f"{TXT_LABEL}.{name}", select_txt_record)
        rfc_fresh = rfc_cached is not None and rfc_cached.fresh(now)
        if self.draft03_compat and txt.kind != "record" and not rfc_fresh:
            # SEED-S2: nothing usable from the RFC record and no RFC policy in force.
            draft_txt = await self._txt(f"{DRAFT_TXT_LABEL}.{name}", select_draft_txt, dialect=DRAFT)
            if draft_txt.kind == "record" or (draft_cached is not None and draft_cached.fresh(now)):
                return await self._carry_out(name, draft_cached, draft_txt, DRAFT, now)
        result = await self._carry_out(name, rfc_cached, txt, RFC, now)
        # Issue 10 item 1 / SEED-S2: an RFC record whose policy could not be fetched (or is in its
        # back-off) replaces nothing: a fresh cached draft-03 policy stays in force until a
        # successful, authenticated fetch replaces it. Otherwise a DNS attacker could publish an
        # RFC record and block its fetch to turn enforcement off.
        keep_draft = draft_cached is not None and draft_cached.fresh(now) and self.draft03_compat
        if result.policy is None and result.source == "none" and keep_draft and draft_cached is not None:
            report = result.failure if draft_cached.policy.mode != "none" else None  # STS-65
            return PolicyResult(name, draft_cached.policy, draft_cached.txt_id, "cache", result.reason, report)
        return result

    async def _carry_out(
        self, name: str, cached: CacheEntry | None, txt: TxtOutcome, dialect: str, now: float
    ) -> PolicyResult:
        decision = decide(cached, txt, now)
        if decision.action is Action.USE_CACHED and decision.entry is not None:
            entry = decision.entry
            return PolicyResult(name, entry.policy, entry.txt_id, "cache", txt.reason or decision.reason)
        if decision.action is Action.FETCH and txt.id is not None:
            failed = self._failed.get((dialect, name))
            if cached is None and failed is not None and backoff_active(*failed, txt.id, now):
                return PolicyResult(name, None, txt.id, "none", "fetch-backoff")  # STS-36
            return await self._fetch(name, cached, decision.entry, txt.id, dialect)
        return PolicyResult(name, None, txt.id, "none", txt.reason or decision.reason)

    async def _fetch(
        self, name: str, cached: CacheEntry | None, fallback: CacheEntry | None, txt_id: str, dialect: str
    ) -> PolicyResult:
        try:
            policy, _text = await fetch_policy(
                name,
                https_port=self.https_port,
                resolver=self.resolver,
                ca_file=self.ca_file,
                timeout=self.fetch_timeout,
                connect_timeout=min(10.0, self.fetch_timeout),
                dialect=dialect,
            )
        except StsError as exc:
            now = self.clock()
            failed_entry = after_fetch_failure(cached, name, txt_id, now)
            if failed_entry is not None:
                # Compare-and-set: if a newer policy was stored meanwhile, our snapshot is stale
                # and marking it must not roll that policy back (issue 10 item 2).
                await self._store(failed_entry, expected=cached)
            else:
                self._failed[(dialect, name)] = (txt_id, now)
            reason = f"fetch-failed ({exc.result_type}): {exc}"
            if fallback is not None:  # STS-58: keep applying the cached policy
                report = exc if fallback.policy.mode != "none" else None  # STS-65
                return PolicyResult(name, fallback.policy, fallback.txt_id, "cache", reason, report)
            return PolicyResult(name, None, txt_id, "none", reason, exc)  # STS-37
        self._failed.pop((dialect, name), None)
        entry = after_fetch_success(name, txt_id, policy, self.clock())
        # A successful fetch is the newest state there is: stored unless an entry from a later
        # fetch is already there (fetch-time order), whichever dialect was cached before.
        await self._store(entry)
        return PolicyResult(name, policy, txt_id, "fetched", "fetched")

    async def _txt(
        self, qname: str, select: Callable[[Sequence[str]], StsRecord], dialect: str = RFC
    ) -> TxtOutcome:
        """TXT lookup -> TxtOutcome; a bad record set is "none" with the reason (STS-11/12/24)."""
        try:
            texts, owner = await self.resolver.txt_with_owner(qname)
        except DnsPermanentError:
            texts, owner = [], qname
        except DnsError as exc:
            return TxtOutcome("error", reason=f"txt-dns-error: {exc}")
        if not texts:
            return TxtOutcome("none", reason="no-record")
        try:
            record = select(texts)
        except StsRecordError as exc:
            return TxtOutcome("none", reason=f"no-usable-record: {exc}")
        if dialect == DRAFT and owner != qname:
            # SEED-S6: mta-sts.<domain> is usually a CNAME to the policy host's provider, so a
            # draft record found only behind it may be the provider's, not the domain's.
            log.warning(
                "draft-03 MTA-STS record for %s was reached through a CNAME to %s: it may belong to "
                "the hosting provider rather than the domain (SEED-S6)",
                qname,
                owner,
            )
        return TxtOutcome("record", record.id)

    async def _cached(self, name: str) -> CacheEntry | None:
        """The cached entry; cache damage is logged as an error on every lookup it touches (item 3)."""
        try:
            entry = await self.cache.get(name)
        except MtaError as exc:
            entry = self.cache.peek(name)  # what this process holds in memory still applies
            log.error("MTA-STS %s; %s", exc, _applies(name, entry))
            return entry
        damage = self.cache.damage(name)
        if damage is not None:
            log.error("MTA-STS %s; %s", damage, _applies(name, entry))
        return entry

    async def _store(self, entry: CacheEntry, expected: CacheEntry | object | None = ANY) -> None:
        """Write `entry`; `expected` makes it a compare-and-set against that snapshot (item 2)."""
        try:
            stored = await self.cache.put(entry, expected)
        except MtaError as exc:
            log.error("could not store the MTA-STS policy of %s (kept in memory only): %s", entry.domain, exc)
            return
        if not stored:
            log.info("MTA-STS policy of %s changed meanwhile; the newer one is kept", entry.domain)

    # ----- proactive refresh (STS-61/62) ---------------------------------------------------

    async def refresh_once(
        self, now: float | None = None, concurrency: int = 4, gate: asyncio.Semaphore | None = None
    ) -> list[PolicyResult]:
        """Refetch the cached policies that are due, for domains used recently; returns the results.

        At most `concurrency` refetches run at once (`gate`, if given, is used instead). An entry
        may be replaced while its refresh waits for the gate; the cache's compare-and-set then
        keeps the newer entry (issue 10 item 2).
        """
        now = self.clock() if now is None else now
        due = []
        for entry in await self.cache.all():
            last = self.cache.last_used(entry.domain)
            if last is None or now - last > RECENT_USE or entry.domain in self._inflight:
                continue
            if refresh_due(entry, now, self.rng):
                due.append(entry)
        gate = gate or asyncio.Semaphore(max(1, concurrency))

        async def one(entry: CacheEntry) -> PolicyResult:
            async with gate:
                return await self._shared(entry.domain, lambda: self._refresh(entry))

        return list(await asyncio.gather(*(one(e) for e in due)))

    async def _refresh(self, entry: CacheEntry) -> PolicyResult:
        """Refetch regardless of the TXT id (STS-61); a changed id is adopted, a lost one kept."""
        # The snapshot may be stale (replaced while the refresh waited for its gate): work from the
        # current entry, so a failed fetch neither hands out nor marks an old policy (item 2).
        entry = self.cache.peek(entry.domain) or entry
        label, select = (
            (TXT_LABEL, select_txt_record)
            if entry.policy.dialect == RFC
            else (
                DRAFT_TXT_LABEL,
                select_draft_txt,
            )
        )
        txt = await self._txt(f"{label}.{entry.domain}", select, dialect=entry.policy.dialect)
        txt_id = txt.id if txt.kind == "record" and txt.id else entry.txt_id
        result = await self._fetch(entry.domain, entry, entry, txt_id, entry.policy.dialect)
        if result.source != "fetched" and entry.policy.mode != "none":
            # STS-62: operator-visible; quiet for mode none (STS-65)
            log.warning("MTA-STS policy refresh for %s failed, cached policy kept: %s", entry.domain, result.reason)
        return result

    async def refresh_loop(self, stop: asyncio.Event, interval: float = 3600.0, concurrency: int = 4) -> None:
        """Run refresh_once every `interval` seconds (jittered) until `stop` is set."""
        while not stop.is_set():
            try:
                await self.refresh_once(concurrency=concurrency)
            except MtaError as exc:
                log.warning("MTA-STS policy refresh pass failed: %s", exc)
            # jitter so many relays (or restarts) don't refresh in lockstep
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval * self.rng.uniform(0.75, 1.25))


def _applies(name: str, entry: CacheEntry | None) -> str:
    if entry is None:
        return f"no cached policy of {name} can be applied until a fetch succeeds"
    return f"the policy of {name} held in memory (id {entry.txt_id}) still applies"


def _normalise(domain: str) -> str:
    """Lower-case A-label form without the trailing dot (STS-5)."""
    return to_ascii(domain.rstrip(".")).lower()


def _override_policy(value: str | Policy) -> Policy | None:
    """ "none" -> no policy; a Policy as is; any other string is read as policy text."""
    if isinstance(value, Policy):
        return value
    if value.strip().lower() == "none":
        return None
    return parse_policy(value)
