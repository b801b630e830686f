"""TLS-RPT session counters (mta.tlsrpt.store) against real SQLite files.

Checklist: STS-93 (counts), STS-91/92 (what is reported), STS-65 (mode none), RPT-10 (one policies[]
entry per applied policy), RPT-9/15 (report fields from stored rows), RPT-23 (report mails not
counted), and the at-most-once `sent` table.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mta.config import TlsRptConfig
from mta.sts.policy import Policy
from mta.tlsrpt.report import RESULT_TYPES, report_json
from mta.tlsrpt.sender import prepare_report
from mta.tlsrpt.store import ResultStore, not_recorded

DAY = datetime.date(2026, 3, 1)
NOON = datetime.datetime(2026, 3, 1, 12, tzinfo=datetime.UTC).timestamp()
ENFORCE = Policy("enforce", ("mx1.example.test", "*.backup.example.test"), 86400)
TESTING = Policy("testing", ("mx1.example.test",), 3600)
NONE_MODE = Policy("none", (), 86400)


class Clock:
    def __init__(self, now: float = NOON) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def session(store: ResultStore, *, domain: str = "example.test", policy: Policy | None = ENFORCE,
            ok: bool = True, rtype: str | None = None, mx: str | None = "mx1.example.test",
            ip: str | None = "127.0.0.5", reason: str = "") -> None:
    store.record(policy_domain=domain, policy=policy, success=ok, result_type=rtype, mx_host=mx,
                 receiving_ip=ip, reason=reason)


def failures(store: ResultStore, day: datetime.date = DAY) -> dict[tuple[str, str, str | None, str | None], int]:
    """(domain, result-type, mx, receiving-ip) -> failed-session-count, from the database."""
    out: dict[tuple[str, str, str | None, str | None], int] = {}
    for domain, summaries in store.summaries_sync(day).items():
        for s in summaries:
            for d in s.failures:
                key = (domain, d.result_type, d.receiving_mx_hostname, d.receiving_ip)
                out[key] = out.get(key, 0) + d.failed_session_count
    return out


async def test_sts_93_counts_per_day_domain_result_mx_ip_survive_reopen(tmp_path: Path) -> None:
    """STS-93: many sessions over two days and domains are counted per (day, domain, result-type, mx,
    ip); after flush and close a fresh instance (a restarted relay) reads exactly those counts."""
    path = tmp_path / "tlsrpt.db"
    clock = Clock()
    store = ResultStore(path, sending_ip="192.0.2.1", clock=clock)
    for _ in range(40):
        session(store)
    for _ in range(3):
        session(store, ok=False, rtype="starttls-not-supported", mx="MX2.example.test.", ip="127.0.0.6")
    for _ in range(2):
        session(store, ok=False, rtype="certificate-expired", mx="mx1.example.test", ip="127.0.0.5",
                reason="X509_V_ERR_CERT_HAS_EXPIRED")
    session(store, ok=False, rtype="certificate-expired", mx="mx1.example.test", ip="127.0.0.7")
    for _ in range(5):
        session(store, domain="other.test", policy=TESTING, mx="mx1.other.test")
    await store.flush()
    clock.now = NOON + 86400  # the next UTC day
    session(store, ok=False, rtype="certificate-not-trusted")
    session(store)
    await store.close()

    again = ResultStore(path)
    try:
        day1 = again.summaries_sync(DAY)
        assert sorted(day1) == ["example.test", "other.test"]
        (ex,) = day1["example.test"]
        assert (ex.policy_type, ex.successful, ex.failed) == ("sts", 40, 6)
        assert failures(again) == {
            ("example.test", "starttls-not-supported", "mx2.example.test", "127.0.0.6"): 3,
            ("example.test", "certificate-expired", "mx1.example.test", "127.0.0.5"): 2,
            ("example.test", "certificate-expired", "mx1.example.test", "127.0.0.7"): 1,
        }
        assert {d.sending_mta_ip for d in ex.failures} == {"192.0.2.1"}
        assert [d.failure_reason_code for d in ex.failures if d.receiving_ip == "127.0.0.5"] == [
            "X509_V_ERR_CERT_HAS_EXPIRED"]
        (other,) = day1["other.test"]
        assert (other.successful, other.failed, other.failures) == (5, 0, ())
        day2 = again.summaries_sync(DAY + datetime.timedelta(days=1))
        assert [(s.successful, s.failed) for s in day2["example.test"]] == [(1, 1)]
        assert again.days_sync() == [DAY, DAY + datetime.timedelta(days=1)]
    finally:
        again.close_sync()


async def test_sts_93_two_instances_writing_concurrently_add_up(tmp_path: Path) -> None:
    """Two ResultStores on one file (like `mta serve` and a second process) flushing at the same time:
    the stored counts are the sums, nothing is lost or doubled (WAL + busy_timeout + UPSERT)."""
    path = tmp_path / "tlsrpt.db"
    a, b = ResultStore(path, clock=Clock()), ResultStore(path, clock=Clock())
    for _ in range(25):  # 25 rounds of concurrent flushes
        for _ in range(4):
            session(a)
            session(b, ok=False, rtype="certificate-host-mismatch")
        session(a, ok=False, rtype="certificate-host-mismatch")
        await asyncio.gather(a.flush(), b.flush())
    await asyncio.gather(a.close(), b.close())
    check = ResultStore(path)
    (summary,) = check.summaries_sync(DAY)["example.test"]
    assert (summary.successful, summary.failed) == (100, 125)
    assert failures(check) == {("example.test", "certificate-host-mismatch", "mx1.example.test", "127.0.0.5"): 125}
    check.close_sync()


async def test_sts_93_concurrent_writer_process_adds_up(tmp_path: Path) -> None:
    """A separate process (the CLI next to the server) writes the same DB while we do: counts add up."""
    path = tmp_path / "tlsrpt.db"
    script = textwrap.dedent(f"""
        import asyncio
        from mta.sts.policy import Policy
        from mta.tlsrpt.store import ResultStore
        async def main():
            store = ResultStore({str(path)!r}, clock=lambda: {NOON!r})
            policy = Policy("enforce", ("mx1.example.test", "*.backup.example.test"), 86400)
            for _ in range(100):
                for _ in range(10):
                    store.record(policy_domain="example.test", policy=policy, success=True, result_type=None,
                                 mx_host="mx1.example.test", receiving_ip="127.0.0.5")
                await store.flush()
            await store.close()
        asyncio.run(main())
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    ours = ResultStore(path, clock=Clock())
    rounds = 0
    try:
        # Keep writing for as long as the other process lives, so the two really overlap (bounded).
        while rounds < 30 or (proc.poll() is None and rounds < 3000):
            for _ in range(10):
                session(ours)
            await ours.flush()
            rounds += 1
            await asyncio.sleep(0.001)
    finally:
        await ours.close()
        assert await asyncio.to_thread(proc.wait, 8) == 0
    check = ResultStore(path)
    assert [(s.successful, s.failed) for s in check.summaries_sync(DAY)["example.test"]] == [(1000 + 10 * rounds, 0)]
    check.close_sync()


async def test_sts_93_failed_flush_keeps_counts_and_never_doubles(tmp_path: Path) -> None:
    """While another connection holds the write lock a flush fails; the counts stay in memory and
    the next flush stores them exactly once."""
    path = tmp_path / "tlsrpt.db"
    store = ResultStore(path, busy_timeout=0.2, clock=Clock())
    session(store)
    await store.flush()  # creates the schema
    for _ in range(3):
        session(store)
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(sqlite3.OperationalError):
            await store.flush()
        assert store.pending() == 3
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    await store.flush()
    assert store.pending() == 0
    assert [(s.successful, s.failed) for s in store.summaries_sync(DAY)["example.test"]] == [(4, 0)]
    await store.close()


async def test_sts_93_flush_loop_makes_counts_visible_within_the_interval(tmp_path: Path) -> None:
    """The server's background flush (flush_interval) makes counts readable by another process soon;
    close() flushes what is left."""
    path = tmp_path / "tlsrpt.db"
    store = ResultStore(path, flush_interval=0.05, clock=Clock())
    stop = asyncio.Event()
    task = asyncio.create_task(store.flush_loop(stop))
    reader = ResultStore(path)
    try:
        session(store)
        for _ in range(100):  # bounded: 100 x 20 ms
            if reader.summaries_sync(DAY):
                break
            await asyncio.sleep(0.02)
        assert [(s.successful, s.failed) for s in reader.summaries_sync(DAY)["example.test"]] == [(1, 0)]
    finally:
        stop.set()
        await task
    session(store, ok=False, rtype="starttls-not-supported")
    await store.close()
    assert [(s.successful, s.failed) for s in reader.summaries_sync(DAY)["example.test"]] == [(1, 1)]
    reader.close_sync()


@pytest.mark.req("STS-91")
async def test_sts_65_mode_none_and_policyless_sessions_are_not_recorded(tmp_path: Path) -> None:
    """STS-65: a policy in mode none counts as no policy; sessions without a policy are only counted
    with record_all_sessions (as no-policy-found); an sts-* discovery failure without any policy is
    counted as an sts policy with an empty policy-string (STS-91)."""
    store = ResultStore(tmp_path / "a.db", clock=Clock())
    session(store, policy=NONE_MODE)
    session(store, policy=NONE_MODE, ok=False, rtype="sts-policy-fetch-error", mx=None, ip=None)
    session(store, domain="plain.test", policy=None)
    session(store, domain="fetchfail.test", policy=None, ok=False, rtype="sts-policy-fetch-error", mx=None,
            ip=None, reason="https://mta-sts.fetchfail.test/.well-known/mta-sts.txt: HTTP 404")
    await store.flush()
    got = store.summaries_sync(DAY)
    assert sorted(got) == ["fetchfail.test"]
    (fail,) = got["fetchfail.test"]
    assert (fail.policy_type, fail.policy_string, fail.mx_host, fail.failed) == ("sts", (), (), 1)
    assert fail.failures[0].receiving_mx_hostname is None and fail.failures[0].receiving_ip is None
    assert "HTTP 404" in (fail.failures[0].failure_reason_code or "")
    await store.close()

    every = ResultStore(tmp_path / "b.db", record_all_sessions=True, clock=Clock())
    session(every, domain="plain.test", policy=None)
    session(every, domain="plain.test", policy=None, ok=False, rtype="starttls-not-supported")
    session(every, domain="none.test", policy=NONE_MODE)  # still not: mode none is never reported
    await every.flush()
    got = every.summaries_sync(DAY)
    assert sorted(got) == ["plain.test"]
    (plain,) = got["plain.test"]
    assert (plain.policy_type, plain.successful, plain.failed) == ("no-policy-found", 1, 1)
    await every.close()


async def test_rpt_23_sessions_of_report_mails_are_not_recorded(tmp_path: Path) -> None:
    """RPT-23/RPT-19: inside not_recorded() (the delivery of a report mail), also in tasks started
    there, nothing is counted; outside it counting goes on."""
    store = ResultStore(tmp_path / "t.db", clock=Clock())

    async def attempt() -> None:
        session(store, ok=False, rtype="certificate-not-trusted")

    with not_recorded():
        session(store)
        await asyncio.gather(attempt(), attempt())
    assert store.pending() == 0
    await attempt()
    assert store.pending() == 1
    await store.close()


async def test_rpt_15_unregistered_result_type_becomes_validation_failure(tmp_path: Path) -> None:
    """RPT-15: only registered result types are stored; anything else is validation-failure with the
    original name as failure-reason-code (so one odd caller cannot invalidate a whole report)."""
    store = ResultStore(tmp_path / "t.db", clock=Clock())
    session(store, ok=False, rtype="tls-handshake-alert", reason="")
    session(store, ok=False, rtype=None, reason="sts-mx-mismatch")
    await store.flush()
    (s,) = store.summaries_sync(DAY)["example.test"]
    assert {d.result_type for d in s.failures} == {"validation-failure"}
    assert sorted(d.failure_reason_code or "" for d in s.failures) == ["sts-mx-mismatch", "tls-handshake-alert"]
    await store.close()


async def test_rpt_9_10_report_from_stored_rows_of_a_mixed_day(tmp_path: Path) -> None:
    """RPT-9/RPT-10/RPT-14/RPT-15: the report built from a day of mixed outcomes (two applied
    policies, successes, TLS failures, an MX outside the policy, a fetch failure), field by field."""
    path = tmp_path / "t.db"
    clock = Clock()
    store = ResultStore(path, sending_ip="192.0.2.1", clock=clock)
    for _ in range(7):
        session(store, policy=TESTING)
    session(store, policy=TESTING, ok=False, rtype="certificate-expired", reason="certificate has expired")
    for _ in range(10):
        session(store)
    for _ in range(2):
        session(store, ok=False, rtype="starttls-not-supported", mx="mx2.backup.example.test", ip="2001:DB8:0:0::6")
    session(store, ok=False, rtype="validation-failure", mx="evil.example.net", ip=None, reason="sts-mx-mismatch")
    session(store, policy=None, ok=False, rtype="sts-policy-fetch-error", mx=None, ip=None, reason="timed out")
    session(store, domain="unrelated.test")  # another domain: another report
    await store.close()

    reader = ResultStore(path)
    cfg = TlsRptConfig(enabled=True, organization_name="Relay Org", contact_info="tlsrpt@sender.test",
                       report_sender="reports@sender.test")
    prepared = prepare_report(cfg, DAY, "example.test", reader.summaries_sync(DAY)["example.test"], "abc123")
    reader.close_sync()
    data = json.loads(report_json(prepared.report))
    assert data["organization-name"] == "Relay Org"
    assert data["contact-info"] == "tlsrpt@sender.test"
    assert data["date-range"] == {"start-datetime": "2026-03-01T00:00:00Z", "end-datetime": "2026-03-01T23:59:59Z"}
    assert data["report-id"] == "2026-03-01.example.test.abc123@sender.test" == prepared.report_id
    assert prepared.filename == "sender.test!example.test!1772323200!1772409599!abc123.json.gz"
    by_policy = {tuple(p["policy"]["policy-string"]): p for p in data["policies"]}
    assert set(by_policy) == {(), tuple(TESTING.lines()), tuple(ENFORCE.lines())}

    enforce = by_policy[tuple(ENFORCE.lines())]
    assert enforce["policy"] == {"policy-type": "sts", "policy-string": ENFORCE.lines(),
                                 "policy-domain": "example.test",
                                 "mx-host": ["mx1.example.test", "*.backup.example.test"]}
    assert enforce["summary"] == {"total-successful-session-count": 10, "total-failure-session-count": 3}
    details = sorted(enforce["failure-details"], key=lambda d: d["result-type"])
    assert details == [
        {"result-type": "starttls-not-supported", "sending-mta-ip": "192.0.2.1",
         "receiving-mx-hostname": "mx2.backup.example.test", "receiving-ip": "2001:db8::6",
         "failed-session-count": 2},
        {"result-type": "validation-failure", "sending-mta-ip": "192.0.2.1",
         "receiving-mx-hostname": "evil.example.net", "failed-session-count": 1,
         "failure-reason-code": "sts-mx-mismatch"},
    ]
    testing = by_policy[tuple(TESTING.lines())]
    assert testing["policy"]["mx-host"] == ["mx1.example.test"]
    assert testing["summary"] == {"total-successful-session-count": 7, "total-failure-session-count": 1}
    assert testing["failure-details"] == [
        {"result-type": "certificate-expired", "sending-mta-ip": "192.0.2.1",
         "receiving-mx-hostname": "mx1.example.test", "receiving-ip": "127.0.0.5", "failed-session-count": 1,
         "failure-reason-code": "certificate has expired"}]
    fetch = by_policy[()]
    assert fetch["policy"] == {"policy-type": "sts", "policy-string": [], "policy-domain": "example.test",
                               "mx-host": []}
    assert fetch["summary"] == {"total-successful-session-count": 0, "total-failure-session-count": 1}
    assert fetch["failure-details"] == [{"result-type": "sts-policy-fetch-error", "sending-mta-ip": "192.0.2.1",
                                         "failed-session-count": 1, "failure-reason-code": "timed out"}]
    for p in data["policies"]:
        assert all(d["result-type"] in RESULT_TYPES for d in p["failure-details"])


async def test_sent_table_claims_each_day_and_domain_once(tmp_path: Path) -> None:
    """At most once: a (day, domain) claimed by one instance cannot be claimed again, neither by the
    same instance nor by a fresh one (a restarted relay or the CLI); other days/domains are free."""
    path = tmp_path / "t.db"
    first = ResultStore(path, clock=Clock())
    assert first.claim_sync(DAY, "example.test", "r1@sender.test") is True
    assert first.claim_sync(DAY, "example.test", "r2@sender.test") is False
    first.finish_sync(DAY, "example.test", "sent", "mailto:x queued as 1")
    first.close_sync()
    fresh = ResultStore(path)
    assert fresh.claim_sync(DAY, "Example.Test.", "r3@sender.test") is False
    assert fresh.claim_sync(DAY + datetime.timedelta(days=1), "example.test", "r4@sender.test") is True
    assert fresh.claim_sync(DAY, "other.test", "r5@sender.test") is True
    row = fresh.sent_sync(DAY)["example.test"]
    assert (row.report_id, row.status, row.detail) == ("r1@sender.test", "sent", "mailto:x queued as 1")
    fresh.prune_sync(DAY + datetime.timedelta(days=1))
    assert fresh.sent_sync(DAY) == {}
    fresh.close_sync()
