"""Send the TLS reports of a UTC day (RFC 8460 §5): discover where, build, claim, deliver.

Rule, per policy domain with stored counts for the day:
1. Skip it when the `sent` table already has (day, domain): a report goes out at most once.
2. Look up `_smtp._tls.<domain>` TXT (select_tlsrpt_record). No usable record means no report
   (RPT-4/6/7; a present but bad record is logged); a temporary DNS failure leaves the domain
   unclaimed, so a later run tries again.
3. Build the report JSON and its gzip (RPT-9..17) with a unique report-id
   `<day>.<domain>.<random>@<submitter>`.
4. Claim (day, domain) in the `sent` table, THEN deliver to every rua target (RPT-3: the report
   counts as sent when one target took it):
   - `mailto:` -> the report email (RPT-18) is put into our own spool with the configured real
     envelope sender (RPT-23), so it is retried like any mail (RPT-21);
   - `https:` -> POST with `Content-Type: application/tlsrpt+gzip` over verified TLS (our DNS
     resolver, certifi or `[tls] ca_file`), a few quick tries with backoff (RPT-20).
5. When no target took the report, each failed https target is queued in `post_retries` and
   tried again with exponential back-off for 24 hours (RPT-21, mta.tlsrpt.retry; the `sent` row
   says `retrying`); the first that accepts makes it `sent`, and after 24 hours it is `failed`.
   `retry_loop` does this in `mta serve`, so retries survive restarts and `mta tlsrpt send`.

`daily_loop` runs this in `mta serve` once a day, after `send_hour_utc` plus a random delay of up
to `max_random_delay` (RPT-12), for the days before today that are not yet claimed.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import random
import secrets
import sqlite3
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from email.utils import formataddr
from typing import Any

import aiohttp
import certifi

from mta import log, metrics
from mta.config import Config, TlsRptConfig
from mta.dkim.signer import Signer
from mta.errors import ConfigError, DnsError, MtaError, SpoolError
from mta.net.dns import AiohttpResolver, Resolver, to_ascii
from mta.spool.state import MessageMeta
from mta.spool.store import SpoolStore, make_meta
from mta.tlsrpt.record import TlsRptRecord, TlsRptRecordError, select_tlsrpt_record
from mta.tlsrpt.report import (
    PolicySummary,
    build_report,
    build_report_email,
    gzip_report,
    report_filename,
    report_json,
    submitter_domain,
)
from mta.tlsrpt.retry import PendingPost, next_try
from mta.tlsrpt.store import ResultStore, utc_day

_log = logging.getLogger("mta.tlsrpt")

MEDIA_TYPE = "application/tlsrpt+gzip"  # RPT-20, for the gzip body (RPT-17)
CATCHUP_DAYS = 3  # days missed while the relay was down are still reported, up to this far back
RETENTION_DAYS = 32  # counts and sent rows older than this are pruned


class ReportDeliveryError(MtaError):
    """A report could not be handed to one rua target."""


def https_context(ca_file: str | None) -> ssl.SSLContext:
    """Verified TLS for report endpoints: chain, validity and DNS-ID (no CN fallback), TLS 1.2+."""
    ctx = ssl.create_default_context(cafile=ca_file or certifi.where())
    ctx.hostname_checks_common_name = False
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


async def discover_record(resolver: Resolver, domain: str) -> TlsRptRecord | None:
    """The usable TLSRPT record of `domain`, or None (logged). Raises DnsError when DNS fails."""
    name = f"_smtp._tls.{to_ascii(domain)}"
    texts = await resolver.txt(name)
    try:
        return select_tlsrpt_record(texts)
    except TlsRptRecordError as exc:
        if any(t.startswith("v=TLSRPTv1") for t in texts):
            _log.warning("tlsrpt: ignoring the TLSRPT record at %s: %s", name, exc)
        else:
            _log.info("tlsrpt: no TLSRPT record at %s; no report for %s", name, domain)
        return None


@dataclass(frozen=True)
class PreparedReport:
    """One report, ready to send: the JSON object, its gzip body and the names derived from it."""

    day: datetime.date
    domain: str  # A-label policy domain
    submitter: str
    report_id: str
    unique_id: str
    filename: str
    report: dict[str, object]
    gz: bytes


def prepare_report(cfg: TlsRptConfig, day: datetime.date, domain: str, policies: Sequence[PolicySummary],
                   unique_id: str) -> PreparedReport:
    """Build the report of `domain` for `day` (RPT-9..17); raises ValueError for unusable data."""
    ascii_domain = to_ascii(domain)
    submitter = submitter_domain(cfg.contact_info)
    report_id = f"{day.isoformat()}.{ascii_domain}.{unique_id}@{submitter}"
    report = build_report(organization_name=cfg.organization_name or submitter, contact_info=cfg.contact_info,
                          report_id=report_id, day=day, policies=policies)
    return PreparedReport(day=day, domain=ascii_domain, submitter=submitter, report_id=report_id,
                          unique_id=unique_id, filename=report_filename(submitter, ascii_domain, day, unique_id),
                          report=report, gz=gzip_report(report_json(report)))


async def post_report(session: aiohttp.ClientSession, url: str, body: bytes, *, tries: int = 3,
                      backoff: float = 2.0, timeout: float = 30.0) -> str:
    """POST the gzip report to an https rua (RPT-20); any 2xx is success. Returns e.g. "HTTP 200".

    Non-2xx answers and network or TLS errors are retried `tries` times in all, waiting
    backoff, 2*backoff, ... in between (RPT-21); then ReportDeliveryError.
    """
    last = "not tried"
    for attempt in range(max(1, tries)):
        if attempt:
            await asyncio.sleep(backoff * 2 ** (attempt - 1))
        try:
            async with session.post(url, data=body, headers={"Content-Type": MEDIA_TYPE},
                                    allow_redirects=False,  # a POST is not replayed elsewhere
                                    timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                if 200 <= resp.status < 300:
                    return f"HTTP {resp.status}"
                last = f"HTTP {resp.status} {resp.reason or ''}".rstrip()
        except (aiohttp.ClientError, ssl.SSLError, OSError, TimeoutError) as exc:
            last = f"{type(exc).__name__}: {exc}"
    raise ReportDeliveryError(f"{url}: {last} (after {max(1, tries)} tries)")


@dataclass
class DomainResult:
    """What happened to one policy domain's report."""

    day: datetime.date
    domain: str
    status: str  # sent | failed | skipped | no-record | error
    detail: str = ""
    report_id: str | None = None
    targets: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"day": self.day.isoformat(), "domain": self.domain, "status": self.status, "detail": self.detail,
                "report_id": self.report_id, "targets": self.targets}


class ReportSender:
    """Builds and sends the reports of a day from a ResultStore (see the module rule)."""

    def __init__(self, cfg: Config, results: ResultStore, store: SpoolStore, resolver: Resolver, *,
                 on_queued: Callable[[MessageMeta], None] | None = None, https_tries: int = 3,
                 https_backoff: float = 2.0, https_timeout: float = 30.0,
                 clock: Callable[[], float] = time.time, rng: random.Random | None = None) -> None:
        if not (cfg.tlsrpt.contact_info and cfg.tlsrpt.report_sender):
            raise MtaError(f"{cfg.source}: tlsrpt.contact_info and tlsrpt.report_sender must be set to send reports")
        self.cfg = cfg
        self.results = results
        self.store = store
        self.resolver = resolver
        self.on_queued = on_queued
        self.https_tries = https_tries
        self.https_backoff = https_backoff
        self.https_timeout = https_timeout
        self.clock = clock
        self.rng = rng or random.Random()
        # Report mails are signed with the general [dkim] keys (RPT-18), whatever dkim.enabled says.
        self.signer = Signer.from_config(cfg)

    def _session(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(resolver=AiohttpResolver(self.resolver),
                                         ssl=https_context(self.cfg.tls.ca_file or None), use_dns_cache=False)
        return aiohttp.ClientSession(connector=connector, trust_env=False, cookie_jar=aiohttp.DummyCookieJar())

    async def preview(self, day: datetime.date) -> list[dict[str, Any]]:
        """What would be sent for `day`: per domain the rua targets, the sent row and the report JSON."""
        summaries = await self.results.summaries(day)
        sent = await self.results.sent(day)
        out: list[dict[str, Any]] = []
        for domain, policies in sorted(summaries.items()):
            entry: dict[str, Any] = {"domain": domain, "rua": None, "error": None, "sent": None, "report": None}
            row = sent.get(domain)
            if row is not None:
                entry["sent"] = {"status": row.status, "report_id": row.report_id, "detail": row.detail}
            try:
                record = await discover_record(self.resolver, domain)
                entry["rua"] = list(record.rua) if record else []
            except DnsError as exc:
                entry["error"] = f"TLSRPT record lookup failed: {exc}"
            try:
                entry["report"] = prepare_report(self.cfg.tlsrpt, day, domain, policies, "preview").report
            except (ValueError, DnsError) as exc:
                entry["error"] = f"cannot build the report: {exc}"
            out.append(entry)
        return out

    async def send_day(self, day: datetime.date) -> list[DomainResult]:
        """Send every not yet claimed report of `day`; returns one result per domain with counts."""
        summaries = await self.results.summaries(day)
        sent = await self.results.sent(day)
        results: list[DomainResult] = []
        async with self._session() as session:
            for domain, policies in sorted(summaries.items()):
                row = sent.get(domain)
                if row is not None:
                    detail = f"already {row.status}" + (f": {row.detail}" if row.detail else "")
                    results.append(DomainResult(day, domain, "skipped", detail, row.report_id))
                    continue
                results.append(await self._send_one(session, day, domain, policies))
        return results

    async def _send_one(self, session: aiohttp.ClientSession, day: datetime.date, domain: str,
                        policies: Sequence[PolicySummary]) -> DomainResult:
        try:
            record = await discover_record(self.resolver, domain)
        except DnsError as exc:
            _log.warning("tlsrpt: cannot look up the TLSRPT record of %s (will retry): %s", domain, exc)
            return DomainResult(day, domain, "error", f"TLSRPT record lookup failed: {exc}")
        if record is None:
            return DomainResult(day, domain, "no-record", "no usable TLSRPT record")
        try:
            report = prepare_report(self.cfg.tlsrpt, day, domain, policies, secrets.token_hex(8))
        except (ValueError, DnsError) as exc:
            _log.error("tlsrpt: cannot build the report of %s for %s: %s", domain, day, exc)
            return DomainResult(day, domain, "error", f"cannot build the report: {exc}")
        if not await self.results.claim(day, report.domain, report.report_id):
            return DomainResult(day, domain, "skipped", "already claimed by another sender")
        jobs = [self._mail(report, address, n) for n, address in enumerate(record.mailto)]
        jobs += [self._post(session, report, url) for url in record.https]
        outcomes = await asyncio.gather(*jobs)
        ok = any(success for success, _ in outcomes)
        targets = [text for _, text in outcomes]
        status = "sent" if ok else "failed"
        if not ok and record.https and await self._queue_retries(report, record.https,
                                                                 [t for _, t in outcomes[len(record.mailto):]]):
            status = "retrying"
        await self.results.finish(day, report.domain, status, "; ".join(targets), report.report_id)
        log.event("tlsrpt", domain=report.domain, day=day.isoformat(), report_id=report.report_id, status=status,
                  reason="; ".join(targets))
        return DomainResult(day, domain, status, "; ".join(targets), report.report_id, targets)

    async def _queue_retries(self, report: PreparedReport, urls: Sequence[str], errors: Sequence[str]) -> bool:
        """RPT-21: keep the report for more tries at each failed https target; False if it cannot be kept."""
        now = self.clock()
        when = next_try(now, 1, now, self.rng)
        if when is None:
            return False
        posts = [PendingPost(report.day, report.domain, url, report.report_id, report.gz, now, 1, when, err)
                 for url, err in zip(urls, errors, strict=True)]
        try:
            await self.results.add_retries(posts)
        except (sqlite3.Error, MtaError) as exc:  # MtaError: the cluster database (issue 15)
            _log.error("tlsrpt: cannot keep the report of %s for retries: %s", report.domain, exc)
            return False
        _log.warning("tlsrpt: report of %s not delivered; trying again for 24 h", report.domain)
        return True

    async def retry_due(self) -> list[DomainResult]:
        """One more POST for each queued report whose next try is due (RPT-21); one result per report."""
        due = await self.results.due_retries(self.clock())
        by_report: dict[tuple[datetime.date, str], list[PendingPost]] = {}
        for post in due:
            by_report.setdefault((post.day, post.domain), []).append(post)
        results: list[DomainResult] = []
        if not by_report:
            return results
        async with self._session() as session:
            for (day, domain), posts in by_report.items():
                results.append(await self._retry_report(session, day, domain, posts))
        return results

    async def _retry_report(self, session: aiohttp.ClientSession, day: datetime.date, domain: str,
                            posts: list[PendingPost]) -> DomainResult:
        report_id = posts[0].report_id
        notes: list[str] = []
        left = len(posts)
        for post in posts:
            try:
                status = await post_report(session, post.url, post.body, tries=1, timeout=self.https_timeout)
            except ReportDeliveryError as exc:
                when = next_try(post.first_failed, post.tries + 1, self.clock(), self.rng)
                if when is None:
                    left = await self.results.drop_retry(day, domain, post.url)
                    notes.append(f"{exc}; given up after {post.tries + 1} rounds in 24 h")
                else:
                    again = PendingPost(day, domain, post.url, report_id, post.body, post.first_failed,
                                        post.tries + 1, when, str(exc))
                    await self.results.add_retries([again])
                    notes.append(f"{exc}; next try in {when - self.clock():.0f} s")
                continue
            await self.results.drop_retry(day, domain)  # one accepting target is enough
            return await self._finish(day, domain, "sent", report_id, [f"{post.url}: {status} (try {post.tries + 1})"])
        if left == 0:
            return await self._finish(day, domain, "failed", report_id, notes)
        return DomainResult(day, domain, "retrying", "; ".join(notes), report_id, notes)

    async def _finish(self, day: datetime.date, domain: str, status: str, report_id: str,
                      targets: list[str]) -> DomainResult:
        await self.results.finish(day, domain, status, "; ".join(targets), report_id)
        log.event("tlsrpt", domain=domain, day=day.isoformat(), report_id=report_id, status=status,
                  reason="; ".join(targets))
        return DomainResult(day, domain, status, "; ".join(targets), report_id, targets)

    async def _mail(self, report: PreparedReport, address: str, n: int) -> tuple[bool, str]:
        """Queue the report email to one mailto: address through our own spool (RPT-18, RPT-23)."""
        tls = self.cfg.tlsrpt
        now = self.clock()
        try:
            from_addr = formataddr((tls.organization_name, tls.report_sender)) if tls.organization_name \
                else tls.report_sender
            data = build_report_email(
                report_gz=report.gz, filename=report.filename, policy_domain=report.domain,
                submitter=report.submitter, report_id=report.report_id, from_addr=from_addr, to_addr=address,
                now=datetime.datetime.fromtimestamp(now, datetime.UTC),
                message_id=f"tlsrpt.{report.unique_id}.{n}@{report.submitter}")
            # RFC 8460 §5.3 (RPT-18): MUST carry a DKIM signature of the reporting domain.
            signed = await asyncio.to_thread(self.signer.sign_report, data, report.submitter, now)
            if signed.note.startswith("unsigned"):
                raise ConfigError(f"no DKIM key for the reporting domain {report.submitter} ([[dkim.keys]])")
            data = signed.data
            # A real envelope sender (RPT-23): bounces of report mails reach the operator.
            meta = make_meta(sender=tls.report_sender, recipients=[address], data=data, now=now, kind="report")
            await self.store.put(meta, data)
        except (SpoolError, ConfigError, ValueError, UnicodeError) as exc:
            _log.error("tlsrpt: cannot queue the report of %s to %s: %s", report.domain, address, exc)
            metrics.tlsrpt_report("mailto", False)
            return False, f"mailto:{address} failed: {exc}"
        metrics.tlsrpt_report("mailto", True)
        if self.on_queued is not None:
            self.on_queued(meta)
        return True, f"mailto:{address} queued as {meta.id}"

    async def _post(self, session: aiohttp.ClientSession, report: PreparedReport, url: str) -> tuple[bool, str]:
        try:
            status = await post_report(session, url, report.gz, tries=self.https_tries,
                                       backoff=self.https_backoff, timeout=self.https_timeout)
        except ReportDeliveryError as exc:
            _log.warning("tlsrpt: report of %s not delivered: %s", report.domain, exc)
            metrics.tlsrpt_report("https", False)
            return False, f"{exc}"
        metrics.tlsrpt_report("https", True)
        return True, f"{url}: {status}"

    async def catch_up(self, today: datetime.date) -> list[DomainResult]:
        """Send the unclaimed reports of the days before `today` (up to CATCHUP_DAYS back); prune old rows."""
        await self.results.flush()  # this process's latest counts belong in the reports
        first = today - datetime.timedelta(days=CATCHUP_DAYS)
        out: list[DomainResult] = []
        for day in await self.results.days():
            if first <= day < today:
                out.extend(await self.send_day(day))
        await self.results.prune(today - datetime.timedelta(days=RETENTION_DAYS))
        return out


def send_time(day: datetime.date, send_hour_utc: int, delay: float) -> float:
    """Unix time of the daily run on `day`: send_hour_utc:00 UTC plus `delay` seconds (RPT-12)."""
    start = datetime.datetime.combine(day, datetime.time(send_hour_utc), datetime.UTC)
    return start.timestamp() + delay


async def _sleep_until(stop: asyncio.Event, when: float, clock: Callable[[], float]) -> bool:
    """Wait until `when` (True) or until `stop` is set (False); re-reads the clock every minute."""
    while not stop.is_set():
        remaining = when - clock()
        if remaining <= 0:
            return True
        try:
            await asyncio.wait_for(stop.wait(), timeout=min(remaining, 60.0))
        except TimeoutError:
            continue
    return False


async def run_daily(sender: ReportSender, cfg: TlsRptConfig, stop: asyncio.Event, *,
                    clock: Callable[[], float] = time.time, rng: random.Random | None = None) -> None:
    """Once per UTC day, after send_hour_utc plus a random delay, send the reports of past days."""
    rng = rng or random.Random()
    done_on: datetime.date | None = None
    while not stop.is_set():
        today = utc_day(clock())
        run_on = today if done_on != today else today + datetime.timedelta(days=1)
        # A start after today's send time runs at once: yesterday's reports are due already.
        if not await _sleep_until(stop, send_time(run_on, cfg.send_hour_utc, rng.uniform(0, cfg.max_random_delay)),
                                  clock):
            return
        today = utc_day(clock())
        try:
            await sender.catch_up(today)
        except (MtaError, OSError, aiohttp.ClientError) as exc:
            _log.error("tlsrpt: daily report run failed: %s", exc)
        except Exception:  # a bug must not end the daily reports for the life of the server
            _log.exception("tlsrpt: daily report run failed")
        done_on = today


async def retry_loop(sender: ReportSender, stop: asyncio.Event, interval: float = 60.0) -> None:
    """Every `interval` seconds, the due retries of undelivered https reports (RPT-21)."""
    while not stop.is_set():
        try:
            await sender.retry_due()
        except (MtaError, OSError, sqlite3.Error, aiohttp.ClientError) as exc:
            _log.error("tlsrpt: report retries failed: %s", exc)
        except Exception:  # a bug must not end the retries for the life of the server
            _log.exception("tlsrpt: report retries failed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval)


async def daily_loop(relay: Any, stop_event: asyncio.Event) -> None:
    """The `mta serve` background task: daily reports from the relay's ResultStore, mails into its
    spool, and the retries of reports no https target took yet."""
    results = relay.recorder
    if not isinstance(results, ResultStore):
        return
    sender = ReportSender(relay.cfg, results, relay.store, relay.resolver, on_queued=relay.on_new_message)
    await asyncio.gather(run_daily(sender, relay.cfg.tlsrpt, stop_event), retry_loop(sender, stop_event))
