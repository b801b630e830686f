"""Sending TLS reports (mta.tlsrpt.sender, `mta tlsrpt`) against real parts on loopback: the fake DNS
server, an aiohttp HTTPS report endpoint with a TestPki certificate, a real spool and SQLite file.

Checklist: RPT-1..4, RPT-7 (discovery), RPT-12 (daily run), RPT-17/18 (gzip, email), RPT-20/21
(HTTPS POST, retries), RPT-23 (real envelope sender) and the at-most-once `sent` table.
"""

from __future__ import annotations

import asyncio
import datetime
import email
import email.policy
import gzip
import json
import logging
import random
from collections.abc import AsyncIterator, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiohttp.web
import pytest

import mta.config
from mta.config import Config
from mta.net.dns import Resolver
from mta.spool import control
from mta.spool.state import MessageMeta
from mta.spool.store import SpoolStore
from mta.sts.policy import Policy
from mta.tlsrpt.sender import ReportSender, retry_loop, run_daily, send_time
from mta.tlsrpt.store import ResultStore
from tests.support.dkim import make_key, verify_all
from tests.support.fake_dns import FakeDns, Zone
from tests.support.pki import TestPki
from tests.support.relay import base_config, deep_merge, run_cli, write_config

DAY = datetime.date(2026, 3, 1)
NOON = datetime.datetime(2026, 3, 1, 12, tzinfo=datetime.UTC).timestamp()
ENFORCE = Policy("enforce", ("mx1.example.test",), 86400)
RUA_HOST, RUA_IP = "rua.report.test", "127.0.0.20"
TLSRPT = "_smtp._tls.example.test"


@pytest.fixture
def dns_server() -> Iterator[FakeDns]:
    with FakeDns(Zone(), host="127.0.0.53") as running:
        running.zone.add(RUA_HOST, "A", RUA_IP)
        yield running


@pytest.fixture
def pki(tmp_path: Path) -> TestPki:
    return TestPki(tmp_path / "pki")


def tlsrpt_settings(tmp_path: Path, dns_server: FakeDns, pki: TestPki) -> dict[str, Any]:
    # RPT-18: report mails are signed with the general [dkim] keys; one for the reporting domain.
    key = make_key(tmp_path / "keys", "sender.test", "rpt")
    key.publish(dns_server.zone)
    return {
        "dkim": {"keys": [key.config()]},
        "dns": {"nameservers": [dns_server.host], "port": dns_server.port, "timeout": "1s"},
        "tls": {"ca_file": str(pki.ca_file)},
        "tlsrpt": {"enabled": True, "organization_name": "Relay Org", "contact_info": "tlsrpt@sender.test",
                   "report_sender": "reports@sender.test", "db_path": str(tmp_path / "queue" / "tlsrpt.db"),
                   "max_random_delay": "0s"},
    }


@pytest.fixture
def cfg(tmp_path: Path, dns_server: FakeDns, pki: TestPki) -> Config:
    data = deep_merge(base_config(tmp_path), tlsrpt_settings(tmp_path, dns_server, pki))
    return mta.config.from_dict(data, "test.toml", tmp_path)


@pytest.fixture
def spool(cfg: Config) -> SpoolStore:
    store = SpoolStore(cfg.queue.path)
    store.prepare()
    return store


class RuaServer:
    """An HTTPS report endpoint: records every request, answers with the queued statuses, then 200."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.statuses = list(statuses or [])
        self.requests: list[tuple[str, str, str, bytes]] = []  # method, path, content-type, body
        self.port = 0

    async def handle(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        self.requests.append((request.method, request.path, request.headers.get("Content-Type", ""),
                              await request.read()))
        return aiohttp.web.Response(status=self.statuses.pop(0) if self.statuses else 200)

    def url(self, path: str = "/v1/tlsrpt") -> str:
        return f"https://{RUA_HOST}:{self.port}{path}"


async def start_rua(pki: TestPki, server: RuaServer, untrusted: bool = False) -> aiohttp.web.AppRunner:
    app = aiohttp.web.Application()
    app.router.add_route("*", "/{tail:.*}", server.handle)
    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, RUA_IP, 0,
                               ssl_context=pki.leaf(RUA_HOST, untrusted=untrusted).server_context())
    await site.start()
    server.port = int(runner.addresses[0][1])
    return runner


@pytest.fixture
async def rua(pki: TestPki) -> AsyncIterator[RuaServer]:
    server = RuaServer()
    runner = await start_rua(pki, server)
    yield server
    await runner.cleanup()


async def record_day(cfg: Config, domain: str = "example.test", ok: int = 3, failed: int = 1,
                     at: float = NOON) -> None:
    """Stored counts for `domain` on the UTC day of `at`, as a relay would leave them."""
    store = ResultStore(cfg.tlsrpt.db_path, sending_ip="192.0.2.1", clock=lambda: at)
    for i in range(ok + failed):
        store.record(policy_domain=domain, policy=ENFORCE, success=i < ok,
                     result_type=None if i < ok else "certificate-expired", mx_host="mx1.example.test",
                     receiving_ip="127.0.0.5", reason="" if i < ok else "certificate has expired")
    await store.close()


def make_sender(cfg: Config, spool: SpoolStore, queued: list[MessageMeta] | None = None) -> ReportSender:
    results = ResultStore(cfg.tlsrpt.db_path)
    on_queued = queued.append if queued is not None else None
    resolver = Resolver(cfg.dns.nameservers, cfg.dns.port, cfg.dns.timeout)
    return ReportSender(cfg, results, spool, resolver, on_queued=on_queued, https_tries=3, https_backoff=0.02,
                        https_timeout=3.0)


def gunzip_json(data: bytes) -> dict[str, Any]:
    assert data[:2] == b"\x1f\x8b"  # RPT-17: gzip
    report = json.loads(gzip.decompress(data))
    assert isinstance(report, dict)
    return report


async def test_rpt_2_20_https_rua_receives_gzip_post(cfg: Config, spool: SpoolStore, dns_server: FakeDns,
                                                     rua: RuaServer) -> None:
    """RPT-2/RPT-20: an https rua gets one POST, Content-Type application/tlsrpt+gzip, over TLS
    validated against the configured CA, host resolved through our DNS; the body is the gzip JSON."""
    dns_server.zone.add(TLSRPT, "TXT", f'"v=TLSRPTv1; rua={rua.url()}"')
    await record_day(cfg)
    sender = make_sender(cfg, spool)
    (result,) = await sender.send_day(DAY)
    assert (result.domain, result.status) == ("example.test", "sent"), result.detail
    assert result.detail == f"{rua.url()}: HTTP 200"
    ((method, path, ctype, body),) = rua.requests
    assert (method, path, ctype) == ("POST", "/v1/tlsrpt", "application/tlsrpt+gzip")
    report = gunzip_json(body)
    assert report["report-id"] == result.report_id
    assert report["report-id"].startswith("2026-03-01.example.test.") and report["report-id"].endswith("@sender.test")
    (policy,) = report["policies"]
    assert policy["summary"] == {"total-successful-session-count": 3, "total-failure-session-count": 1}
    assert policy["failure-details"][0]["result-type"] == "certificate-expired"
    assert dns_server.count(RUA_HOST, "A") >= 1
    assert sender.results.sent_sync(DAY)["example.test"].status == "sent"
    assert spool.ids() == []


async def test_rpt_21_https_retried_then_accepted(cfg: Config, spool: SpoolStore, dns_server: FakeDns,
                                                  rua: RuaServer) -> None:
    """RPT-21/RPT-20: a 503 and a 500 are retried with backoff; the 201 of the third try is success."""
    rua.statuses = [503, 500, 201]
    dns_server.zone.add(TLSRPT, "TXT", f'"v=TLSRPTv1; rua={rua.url()}"')
    await record_day(cfg)
    (result,) = await make_sender(cfg, spool).send_day(DAY)
    assert result.status == "sent" and result.detail.endswith("HTTP 201")
    assert len(rua.requests) == 3
    assert len({body for *_, body in rua.requests}) == 1  # the same report each time


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def clocked_sender(cfg: Config, spool: SpoolStore, clock: Clock) -> ReportSender:
    resolver = Resolver(cfg.dns.nameservers, cfg.dns.port, cfg.dns.timeout)
    return ReportSender(cfg, ResultStore(cfg.tlsrpt.db_path), spool, resolver, https_tries=3, https_backoff=0.02,
                        https_timeout=3.0, clock=clock, rng=random.Random(7))


async def test_rpt_21_failing_endpoint_retried_with_backoff_until_accepted(
        cfg: Config, spool: SpoolStore, dns_server: FakeDns, rua: RuaServer) -> None:
    """RPT-21: three quick tries fail, so the report is kept (`retrying`) instead of given up; a
    minute later one more POST (503), two minutes after that a 201: `sent`, the same report body
    every time, and a later run neither resends nor retries it."""
    rua.statuses = [500, 500, 500, 503, 201]
    dns_server.zone.add(TLSRPT, "TXT", f'"v=TLSRPTv1; rua={rua.url()}"')
    await record_day(cfg)
    clock = Clock(NOON + 86400)
    sender = clocked_sender(cfg, spool, clock)
    (result,) = await sender.send_day(DAY)
    assert result.status == "retrying" and "HTTP 500" in result.detail
    assert sender.results.sent_sync(DAY)["example.test"].status == "retrying"
    assert len(rua.requests) == 3
    (pending,) = sender.results.due_retries_sync(float("inf"))
    assert 54 <= pending.next_try - clock.now <= 66 and pending.tries == 1
    clock.now += 30
    assert await sender.retry_due() == [] and len(rua.requests) == 3  # not due yet
    clock.now = pending.next_try
    (again,) = await sender.retry_due()
    assert again.status == "retrying" and "HTTP 503" in again.detail and len(rua.requests) == 4
    (pending,) = sender.results.due_retries_sync(float("inf"))
    assert 108 <= pending.next_try - clock.now <= 132 and pending.tries == 2  # the delay doubled
    clock.now = pending.next_try
    (done,) = await sender.retry_due()
    assert (done.status, done.report_id) == ("sent", result.report_id) and "HTTP 201" in done.detail
    assert sender.results.sent_sync(DAY)["example.test"].status == "sent"
    assert sender.results.due_retries_sync(float("inf")) == []
    assert len(rua.requests) == 5 and len({body for *_, body in rua.requests}) == 1
    clock.now += 86400
    assert await sender.retry_due() == []
    (skipped,) = await sender.send_day(DAY)
    assert skipped.status == "skipped" and len(rua.requests) == 5


async def test_rpt_21_report_given_up_after_24_hours_of_backoff(
        cfg: Config, spool: SpoolStore, dns_server: FakeDns, rua: RuaServer) -> None:
    """RPT-21: an endpoint that never accepts is tried with growing gaps (capped at 2 h) until 24 h
    after the first failure, the last try at the 24 h mark; then the report is `failed` for good."""
    rua.statuses = [500] * 100
    dns_server.zone.add(TLSRPT, "TXT", f'"v=TLSRPTv1; rua={rua.url()}"')
    await record_day(cfg)
    start = NOON + 86400
    clock = Clock(start)
    sender = clocked_sender(cfg, spool, clock)
    (result,) = await sender.send_day(DAY)
    assert result.status == "retrying"
    tries_at: list[float] = []
    final = result
    while final.status == "retrying":
        (pending,) = sender.results.due_retries_sync(float("inf"))
        clock.now = pending.next_try
        tries_at.append(clock.now)
        (final,) = await sender.retry_due()
        assert len(tries_at) < 40
    assert final.status == "failed" and "given up" in final.detail
    assert sender.results.sent_sync(DAY)["example.test"].status == "failed"
    assert tries_at[-1] == start + 24 * 3600  # the last try closes the window
    gaps = [b - a for a, b in zip([start, *tries_at], tries_at, strict=False)]
    assert gaps[1] > gaps[0] * 1.5 and max(gaps) <= 2 * 3600 * 1.1
    assert len(rua.requests) == 3 + len(tries_at)
    clock.now += 3600
    assert await sender.retry_due() == [] and len(rua.requests) == 3 + len(tries_at)


async def test_rpt_21_retry_loop_of_mta_serve_posts_due_reports(
        cfg: Config, spool: SpoolStore, dns_server: FakeDns, rua: RuaServer) -> None:
    """RPT-21: the background loop `mta serve` runs retries due reports without any other trigger."""
    rua.statuses = [500, 500, 500]
    dns_server.zone.add(TLSRPT, "TXT", f'"v=TLSRPTv1; rua={rua.url()}"')
    await record_day(cfg)
    clock = Clock(NOON + 86400)
    sender = clocked_sender(cfg, spool, clock)
    assert (await sender.send_day(DAY))[0].status == "retrying"
    clock.now += 3600
    stop = asyncio.Event()
    task = asyncio.create_task(retry_loop(sender, stop, interval=0.05))
    for _ in range(200):
        if sender.results.sent_sync(DAY)["example.test"].status == "sent":
            break
        await asyncio.sleep(0.02)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert sender.results.sent_sync(DAY)["example.test"].status == "sent" and len(rua.requests) == 4


async def test_rpt_20_https_endpoint_certificate_is_validated(cfg: Config, spool: SpoolStore,
                                                              dns_server: FakeDns, pki: TestPki) -> None:
    """RPT-20 (validated TLS): an endpoint whose certificate is from an untrusted CA never gets the
    report; the failure names the certificate problem."""
    server = RuaServer()
    runner = await start_rua(pki, server, untrusted=True)
    try:
        dns_server.zone.add(TLSRPT, "TXT", f'"v=TLSRPTv1; rua={server.url()}"')
        await record_day(cfg)
        (result,) = await make_sender(cfg, spool).send_day(DAY)
    finally:
        await runner.cleanup()
    assert result.status == "retrying" and "certificate" in result.detail.lower()  # RPT-21: tried again later
    assert server.requests == []


async def test_rpt_1_18_23_mailto_report_is_queued_in_the_spool(cfg: Config, spool: SpoolStore,
                                                                dns_server: FakeDns) -> None:
    """RPT-1/RPT-18/RPT-23: a mailto rua puts one report mail into our spool with the configured real
    envelope sender, the rua address as recipient and kind "report"; the body is the RFC 8460 email
    whose gzip attachment holds the report JSON."""
    dns_server.zone.add(TLSRPT, "TXT", '"v=TLSRPTv1; rua=mailto:tls-reports@report.test"')
    await record_day(cfg)
    queued: list[MessageMeta] = []
    (result,) = await make_sender(cfg, spool, queued).send_day(DAY)
    assert result.status == "sent", result.detail
    (qid,) = spool.ids()
    assert [m.id for m in queued] == [qid] and result.detail == f"mailto:tls-reports@report.test queued as {qid}"
    meta = spool.load_sync(qid)
    assert meta.sender == "reports@sender.test"  # RPT-23: never the null sender
    assert [r.address for r in meta.recipients] == ["tls-reports@report.test"]
    assert meta.kind == "report"
    raw = spool.read_data_sync(qid)
    assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")
    # RPT-18: signed by the reporting domain with the [dkim] key, TLS-Report-* covered, no l=.
    assert raw.startswith(b"DKIM-Signature:") and verify_all(raw, dns_server) == [True]
    signature = raw.split(b"\r\n\r\n", 1)[0].decode().lower()
    assert "d=sender.test" in signature and "tls-report-domain" in signature and " l=" not in signature
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    assert msg["To"] == "tls-reports@report.test"
    assert msg["From"].addresses[0].addr_spec == "reports@sender.test"
    assert msg["TLS-Report-Domain"] == "example.test" and msg["TLS-Report-Submitter"] == "sender.test"
    assert msg.get_content_type() == "multipart/report" and msg.get_param("report-type") == "tlsrpt"
    (attachment,) = [p for p in msg.iter_attachments() if p.get_content_type() == "application/tlsrpt+gzip"]
    assert attachment.get_filename().startswith("sender.test!example.test!1772323200!1772409599!")
    report = gunzip_json(attachment.get_content())
    assert report["report-id"] == result.report_id and report["report-id"] in msg["Subject"]
    assert report["policies"][0]["policy"]["policy-domain"] == "example.test"


async def test_rpt_3_one_accepting_target_is_enough(cfg: Config, spool: SpoolStore, dns_server: FakeDns) -> None:
    """RPT-3: with a mailto and an https target where the https one is unreachable, the report still
    counts as sent (one target accepted); both outcomes are listed."""
    dead = f"https://{RUA_HOST}:9/t"  # nothing listens on port 9 of 127.0.0.20
    dns_server.zone.add(TLSRPT, "TXT", f'"v=TLSRPTv1; rua=mailto:a@report.test,{dead}"')
    await record_day(cfg)
    (result,) = await make_sender(cfg, spool).send_day(DAY)
    assert result.status == "sent"
    assert len(result.targets) == 2 and result.targets[0].startswith("mailto:a@report.test queued as ")
    assert result.targets[1].startswith(dead) and "3 tries" in result.targets[1]
    assert len(spool.ids()) == 1


@pytest.mark.parametrize("records", [
    ['"v=TLSRPTv1; rua=mailto:a@report.test"', '"v=TLSRPTv1; rua=mailto:b@report.test"'],  # RPT-4
    ['"v=TLSRPTv1; rua=http://report.test/insecure"'],  # RPT-7
    ['"v=TLSRPTv1; ruf=mailto:a@report.test"'],  # RPT-6
])
async def test_rpt_4_6_7_bad_records_are_ignored_with_a_log_line(
        cfg: Config, spool: SpoolStore, dns_server: FakeDns, caplog: pytest.LogCaptureFixture,
        records: list[str]) -> None:
    """RPT-4/6/7: several TLSRPT records, only an http: URI, or no rua: nothing is sent, a warning
    names the record, and (day, domain) is not claimed."""
    for text in records:
        dns_server.zone.add(TLSRPT, "TXT", text)
    dns_server.zone.add(TLSRPT, "TXT", '"v=spf1 -all"')  # unrelated TXT at the same name
    await record_day(cfg)
    caplog.set_level(logging.INFO, logger="mta.tlsrpt")
    sender = make_sender(cfg, spool)
    (result,) = await sender.send_day(DAY)
    assert result.status == "no-record"
    warnings = [r for r in caplog.records if r.name == "mta.tlsrpt" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and TLSRPT in warnings[0].getMessage()
    assert spool.ids() == [] and sender.results.sent_sync(DAY) == {}


async def test_rpt_1_no_record_means_no_report(cfg: Config, spool: SpoolStore, dns_server: FakeDns,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """No TXT at `_smtp._tls.<domain>` (NXDOMAIN): no report, no warning, not claimed."""
    await record_day(cfg)
    caplog.set_level(logging.INFO, logger="mta.tlsrpt")
    sender = make_sender(cfg, spool)
    (result,) = await sender.send_day(DAY)
    assert result.status == "no-record"
    assert not [r for r in caplog.records if r.name == "mta.tlsrpt" and r.levelno >= logging.WARNING]
    assert dns_server.count(TLSRPT, "TXT") >= 1
    assert sender.results.sent_sync(DAY) == {} and spool.ids() == []


async def test_rpt_1_dns_failure_is_retried_later(cfg: Config, spool: SpoolStore, dns_server: FakeDns) -> None:
    """A SERVFAIL for the TLSRPT record leaves the domain unclaimed; the next run sends the report."""
    dns_server.zone.add(TLSRPT, "TXT", '"v=TLSRPTv1; rua=mailto:a@report.test"')
    dns_server.zone.set_rcode(TLSRPT, "SERVFAIL")
    await record_day(cfg)
    sender = make_sender(cfg, spool)
    (first,) = await sender.send_day(DAY)
    assert first.status == "error" and "lookup failed" in first.detail
    assert sender.results.sent_sync(DAY) == {}
    dns_server.zone.set_rcode(TLSRPT, None)
    (second,) = await sender.send_day(DAY)
    assert second.status == "sent" and len(spool.ids()) == 1


async def test_sent_table_prevents_a_second_send_from_a_fresh_instance(
        cfg: Config, spool: SpoolStore, dns_server: FakeDns) -> None:
    """Never twice: a second sender on a fresh ResultStore (a restarted relay) skips the day and
    domain; only the other domain's report goes out."""
    dns_server.zone.add(TLSRPT, "TXT", '"v=TLSRPTv1; rua=mailto:a@report.test"')
    dns_server.zone.add("_smtp._tls.late.test", "TXT", '"v=TLSRPTv1; rua=mailto:b@report.test"')
    await record_day(cfg)
    (first,) = await make_sender(cfg, spool).send_day(DAY)
    assert first.status == "sent"
    await record_day(cfg, domain="late.test")
    results = await make_sender(cfg, spool).send_day(DAY)
    assert [(r.domain, r.status) for r in results] == [("example.test", "skipped"), ("late.test", "sent")]
    assert results[0].report_id == first.report_id
    assert sorted(spool.load_sync(q).recipients[0].address for q in spool.ids()) == ["a@report.test",
                                                                                     "b@report.test"]


async def test_rpt_12_daily_run_sends_past_days_once_and_not_today(
        cfg: Config, spool: SpoolStore, dns_server: FakeDns) -> None:
    """RPT-11/RPT-12: started after the send hour, the daily run sends the unclaimed reports of the
    days before today (once), not today's partial day; then it waits for the next day."""
    dns_server.zone.add(TLSRPT, "TXT", '"v=TLSRPTv1; rua=mailto:a@report.test"')
    await record_day(cfg)  # DAY
    await record_day(cfg, at=NOON + 86400)  # "today"
    now = NOON + 86400 - 7 * 3600  # DAY + 1, 05:00 UTC; send hour 0, no random delay
    queued: list[MessageMeta] = []
    sender = make_sender(cfg, spool, queued)
    sender.clock = lambda: now
    stop = asyncio.Event()
    task = asyncio.create_task(run_daily(sender, cfg.tlsrpt, stop, clock=lambda: now))
    try:
        for _ in range(200):  # bounded: 200 x 20 ms
            if queued:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)  # a second (wrong) send would show up here
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
    assert len(queued) == 1 and len(spool.ids()) == 1
    assert sender.results.sent_sync(DAY)["example.test"].status == "sent"
    assert sender.results.sent_sync(DAY + datetime.timedelta(days=1)) == {}


def test_rpt_12_send_time_is_send_hour_plus_delay() -> None:
    """RPT-12: the daily run is at send_hour_utc:00 UTC plus the random delay, never at exactly 00:00."""
    at = datetime.datetime.fromtimestamp(send_time(DAY, 3, 610.0), datetime.UTC)
    assert at == datetime.datetime(2026, 3, 1, 3, 10, 10, tzinfo=datetime.UTC)


async def test_cli_tlsrpt_show_and_send_never_twice(tmp_path: Path, dns_server: FakeDns, pki: TestPki) -> None:
    """`mta tlsrpt show --date D --json` prints the report and rua; `mta tlsrpt send --date D` sends
    it once (the mail enters the spool); a second `send` in a new process prints it as skipped."""
    data = deep_merge(base_config(tmp_path), tlsrpt_settings(tmp_path, dns_server, pki))
    config = write_config(tmp_path, data)
    cfg = mta.config.load(config)
    dns_server.zone.add(TLSRPT, "TXT", '"v=TLSRPTv1; rua=mailto:a@report.test"')
    await record_day(cfg)

    show = await asyncio.to_thread(run_cli, config, "tlsrpt", "show", "--date", "2026-03-01", "--json")
    assert show.returncode == 0, show.stderr
    shown = json.loads(show.stdout)
    (entry,) = shown["reports"]
    assert (entry["domain"], entry["rua"], entry["sent"]) == ("example.test", ["mailto:a@report.test"], None)
    assert entry["report"]["policies"][0]["summary"]["total-successful-session-count"] == 3

    first = await asyncio.to_thread(run_cli, config, "tlsrpt", "send", "--date", "2026-03-01")
    assert first.returncode == 0, first.stderr
    assert "2026-03-01 example.test: sent (mailto:a@report.test queued as " in first.stdout
    spool = SpoolStore(cfg.queue.path)
    assert len(spool.ids()) == 1
    second = await asyncio.to_thread(run_cli, config, "tlsrpt", "send", "--date", "2026-03-01", "--json")
    assert second.returncode == 0, second.stderr
    (row,) = json.loads(second.stdout)
    assert (row["domain"], row["status"]) == ("example.test", "skipped")
    assert len(spool.ids()) == 1
    bad = await asyncio.to_thread(run_cli, config, "tlsrpt", "send", "--date", "yesterday")
    assert bad.returncode == 2 and "YYYY-MM-DD" in bad.stderr


async def test_cli_tlsrpt_send_hands_report_mail_to_a_running_server(
        tmp_path: Path, dns_server: FakeDns, pki: TestPki) -> None:
    """While a server holds the spool lock, `mta tlsrpt send` puts the report mail into the spool and
    asks the server (ctl/ flush request for that queue id) to deliver it."""
    data = deep_merge(base_config(tmp_path), tlsrpt_settings(tmp_path, dns_server, pki))
    config = write_config(tmp_path, data)
    cfg = mta.config.load(config)
    dns_server.zone.add(TLSRPT, "TXT", '"v=TLSRPTv1; rua=mailto:a@report.test"')
    await record_day(cfg)
    server_side = SpoolStore(cfg.queue.path)
    server_side.lock()  # what `mta serve` holds while it runs
    try:
        sent = await asyncio.to_thread(run_cli, config, "tlsrpt", "send", "--date", "2026-03-01", "--json")
        assert sent.returncode == 0, sent.stderr
        (row,) = json.loads(sent.stdout)
        assert row["status"] == "sent"
        (qid,) = server_side.ids()
        assert row["targets"] == [f"mailto:a@report.test queued as {qid}"]
        assert control.take_requests(server_side) == [{"op": "flush", "id": qid}]
    finally:
        server_side.unlock()
