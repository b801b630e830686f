"""Deliver one spooled message: group due recipients by domain, attempt, apply, persist, bounce.

Rule: the meta file is rewritten only AFTER the attempt's outcomes are known, so a crash or
SIGTERM mid-attempt leaves the recipients queued/deferred and they are tried again (at-least-
once; the only duplicates are deliveries cut between the remote 250 and our state write).
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import logging
import random
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace

from mta import log, metrics, runtime
from mta.config import DeliveryConfig
from mta.delivery.attempt import AttemptContext, deliver_domain
from mta.delivery.dsn import FailedRecipient, bounce_recipient, build_dsn, should_bounce
from mta.errors import SpoolError
from mta.model import RecipientStatus, SmtpReply
from mta.spool import state
from mta.spool.state import MessageMeta, Outcome
from mta.spool.store import SpoolStore, make_meta
from mta.tlsrpt.store import not_recorded

_log = logging.getLogger("mta.delivery")
NOTICE_RETRY = 60.0  # seconds before queueing an owed DSN is tried again


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower().rstrip(".")


def _utc(ts: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC)


class Worker:
    """Carries out attempts for whole messages; shared by every scheduler task."""

    def __init__(self, store: SpoolStore, ctx: AttemptContext, cfg: DeliveryConfig,
                 on_new_message: Callable[[MessageMeta], None], clock: Callable[[], float] = time.time,
                 rng: random.Random | None = None) -> None:
        self.store = store
        self.ctx = ctx
        self.cfg = cfg
        self.on_new_message = on_new_message
        self.clock = clock
        self.rng = rng or random.Random()
        self._domain_slots: dict[str, asyncio.Semaphore] = {}

    def _slot(self, domain: str) -> asyncio.Semaphore:
        sem = self._domain_slots.get(domain)
        if sem is None:
            sem = self._domain_slots[domain] = asyncio.Semaphore(self.cfg.per_domain_concurrency)
        return sem

    async def _attempt(self, domain: str, rcpts: list[str], meta: MessageMeta, data: bytes) -> dict[str, Outcome]:
        async with self._slot(domain):
            # DLV-1: one deadline for the whole attempt, so a hostile MX list (many hosts and
            # addresses, each slow just below its own timeouts) cannot hold a worker for their sum.
            deadline = asyncio.timeout(self.cfg.attempt_timeout)
            try:
                async with deadline:
                    started = time.monotonic()
                    outcomes = await deliver_domain(self.ctx, domain, rcpts, meta.sender, data,
                                                    eight_bit=meta.eight_bit, smtputf8=meta.smtputf8,
                                                    apply_sts=meta.kind != "report")
                metrics.attempt_finished(time.monotonic() - started, (o.kind for o in outcomes.values()))
                return outcomes
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug must defer, never lose or bounce mail
                if isinstance(exc, TimeoutError) and deadline.expired():
                    metrics.attempt_finished(self.cfg.attempt_timeout, [state.TRANSIENT])
                    reply = SmtpReply(451, f"attempt to {domain} stopped at its deadline "
                                           f"(delivery.attempt_timeout = {self.cfg.attempt_timeout:g} s)", "4.4.1")
                    return {r: Outcome(state.TRANSIENT, reply) for r in rcpts}
                _log.exception("delivery to %s failed unexpectedly", domain)
                reply = SmtpReply(451, f"local error: {type(exc).__name__}: {exc}", "4.3.0")
                return {r: Outcome(state.TRANSIENT, reply) for r in rcpts}

    def _load(self, qid: str) -> tuple[MessageMeta, bytes]:
        """Envelope and message in one read (the hot path needs both every time)."""
        try:
            return self.store.load_with_data_sync(qid)
        except OSError as exc:
            raise SpoolError(f"{qid}: cannot read message data: {exc.strerror or exc}") from None

    async def deliver(self, qid: str) -> float | None:
        """Run one attempt for every due recipient of `qid`; returns when it is next due (None: done)."""
        try:
            if self.store.fresh(qid):
                meta, data = self._load(qid)  # in the page cache: cheaper than a thread hop (issue 18)
            else:
                meta, data = await runtime.offload(self._load, qid)
        except SpoolError as exc:
            _log.error("cannot load %s: %s", qid, exc)
            return None
        if meta.held:
            return None
        if meta.done:
            await self.store.remove(qid)
            return None
        now = self.clock()
        due = [r for r in meta.pending if r.next_attempt <= now + 0.001]
        if not due:
            if meta.owed_notices:
                return await self._finish(meta, {}, data)  # a DSN that could not be queued before
            return meta.next_due()
        groups: dict[str, list[str]] = defaultdict(list)
        for r in due:
            groups[_domain(r.address)].append(r.address)
        attempts = (self._attempt(d, rs, meta, data) for d, rs in groups.items())
        if meta.kind == "report":
            # RPT-23: a TLS report's own delivery never ends up in the next report.
            with not_recorded():
                results = await asyncio.gather(*attempts)
        else:
            results = await asyncio.gather(*attempts)
        outcomes: dict[str, Outcome] = {}
        for res in results:
            outcomes.update(res)
        return await self._finish(meta, outcomes, data)

    async def _finish(self, meta: MessageMeta, outcomes: dict[str, Outcome], data: bytes) -> float | None:
        now = self.clock()
        lifetime = self.cfg.bounce_lifetime if meta.kind == "dsn" else self.cfg.max_queue_lifetime
        rcpts = []
        for r in meta.recipients:
            outcome = outcomes.get(r.address)
            if outcome is None or r.status.final:
                rcpts.append(r)
                continue
            new = state.apply(r, outcome, now=now, created=meta.created, intervals=self.cfg.retry_intervals,
                              lifetime=lifetime, rng=self.rng)
            rcpts.append(new)
            self._log_outcome(meta, new, outcome, now)
        meta = replace(meta, recipients=tuple(rcpts))
        owed = meta.owed_notices
        if owed and await self._bounce(meta, owed, data, now):
            notified = {r.address for r in owed}
            meta = replace(meta, recipients=tuple(replace(r, notified=True) if r.address in notified else r
                                                  for r in meta.recipients))
        meta = await self._maybe_warn(meta, data, now)
        if meta.done:
            await self.store.remove(meta.id)
            return None
        await self.store.update(meta)
        # A DSN that could not be queued (disk full) is owed: the message stays and we try again.
        return now + NOTICE_RETRY if meta.owed_notices else meta.next_due()

    def _log_outcome(self, meta: MessageMeta, r: state.Recipient, outcome: Outcome, now: float) -> None:
        name = {RecipientStatus.DELIVERED: "delivered", RecipientStatus.BOUNCED: "bounced"}.get(r.status, "deferred")
        metrics.delivery(name, outcome.sts_mode)
        log.event(name, queue_id=meta.id, recipient=r.address, domain=_domain(r.address),
                  mx=outcome.remote_mta, relay=outcome.relay, delay=round(now - meta.created, 2),
                  tls=outcome.tls or "none", verified=outcome.verified, sts_mode=outcome.sts_mode,
                  policy=outcome.policy, status=r.status_code, reason=r.reason or None,
                  reply=str(outcome.reply), attempts=r.attempts)

    async def _queue_notice(self, meta: MessageMeta, failed: list[FailedRecipient], data: bytes, now: float) -> bool:
        """Queue a DSN; False only when it could not be stored (worth trying again later)."""
        to = bounce_recipient(meta.sender)
        try:
            body = build_dsn(reporting_mta=self.ctx.hostname, original_sender=to, original=data, recipients=failed,
                             arrival=_utc(meta.created), now=_utc(now),
                             message_id=email.utils.make_msgid(domain=self.ctx.hostname))
        except ValueError as exc:
            # An unusable sender address can never get a DSN; the failure is in the log either way.
            _log.error("no DSN for %s: %s", meta.id, exc)
            return True
        dsn = make_meta(sender="", recipients=[to], data=body, now=now, kind="dsn")
        try:
            await self.store.put(dsn, body)
        except SpoolError as exc:
            _log.error("cannot queue DSN for %s (will try again): %s", meta.id, exc)
            return False
        log.event("accepted", queue_id=dsn.id, **{"from": ""}, nrcpt=1, size=dsn.size,
                  reason=f"DSN for {meta.id}")
        self.on_new_message(dsn)
        return True

    async def _bounce(self, meta: MessageMeta, bounced: list[state.Recipient], data: bytes, now: float) -> bool:
        """One DSN listing every recipient in `bounced` (DSN-11); True once it is queued."""
        # SMTP-40 / DSN-12: never a bounce for a message whose sender is <> (a bounce itself).
        if not should_bounce(meta.sender) or meta.kind != "mail":
            return True
        failed = [FailedRecipient(address=r.address, status=r.status_code or "5.0.0",
                                  remote_mta=r.remote_mta, diagnostic=r.last_error or None,
                                  last_attempt=_utc(r.last_attempt or now), reason=r.reason or r.last_error)
                  for r in bounced]
        return await self._queue_notice(meta, failed, data, now)

    async def _maybe_warn(self, meta: MessageMeta, data: bytes, now: float) -> MessageMeta:
        """Optional delay warning (DSN-13): once per message after `delivery.delay_warning`."""
        if (not self.cfg.delay_warning or meta.delay_warned or meta.kind != "mail" or not should_bounce(meta.sender)
                or now - meta.created < self.cfg.delay_warning):
            return meta
        deferred = [r for r in meta.recipients if r.status is RecipientStatus.DEFERRED]
        if not deferred:
            return meta
        until = _utc(meta.created + self.cfg.max_queue_lifetime)
        failed = [FailedRecipient(address=r.address, status=(r.status_code or "4.0.0").replace("5.", "4.", 1),
                                  action="delayed", remote_mta=r.remote_mta, diagnostic=r.last_error or None,
                                  last_attempt=_utc(r.last_attempt or now), reason=r.reason or r.last_error,
                                  will_retry_until=until)
                  for r in deferred]
        if not await self._queue_notice(meta, failed, data, now):
            return meta
        return replace(meta, delay_warned=True)
