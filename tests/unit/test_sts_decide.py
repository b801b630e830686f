"""RFC 8461 cache decisions (checklist 1E, STS-36) and per-delivery verdicts (1G, 1H STS-92)."""

from __future__ import annotations

import random

import pytest

from mta.model import TlsInfo
from mta.sts.decide import (
    FETCH_BACKOFF,
    REFRESH_HORIZON,
    Action,
    CacheEntry,
    MxVerdict,
    TlsVerdict,
    TxtOutcome,
    after_fetch_failure,
    after_fetch_success,
    backoff_active,
    cert_result_type,
    check_tls,
    decide,
    filter_mx,
    refresh_due,
    tls_version_ok,
)
from mta.sts.policy import Policy

T0 = 1_700_000_000.0
DAY = 86400.0
ENFORCE = Policy("enforce", ("*.example.com", "mail.example.net"), 604800)
TESTING = Policy("testing", ("*.example.com",), 86400)
NONE = Policy("none", (), 86400)

REC_A = TxtOutcome("record", "A")
REC_B = TxtOutcome("record", "B")
NO_REC = TxtOutcome("none", reason="nxdomain")
DNS_ERR = TxtOutcome("error", reason="servfail")


def entry(txt_id: str = "A", policy: Policy = ENFORCE, at: float = T0, **kw: object) -> CacheEntry:
    return CacheEntry("example.com", txt_id, policy, at, at + policy.max_age, **kw)  # type: ignore[arg-type]


# --- 1E: cache decisions ---------------------------------------------------------------------

FRESH = entry()
NOW = T0 + 1000


@pytest.mark.parametrize(
    ("item", "cached", "txt", "now", "action", "reason", "uses_entry"),
    [
        ("STS-55", None, REC_A, NOW, Action.FETCH, "no-cache", False),
        ("STS-55", FRESH, REC_A, NOW, Action.USE_CACHED, "cached", True),
        ("STS-56", FRESH, DNS_ERR, NOW, Action.USE_CACHED, "txt-dns-error", True),
        ("STS-56", FRESH, NO_REC, NOW, Action.USE_CACHED, "no-record", True),
        ("STS-57", FRESH, TxtOutcome("none", reason="nodata"), NOW, Action.USE_CACHED, "no-record", True),
        ("STS-56", FRESH, TxtOutcome("record", None), NOW, Action.USE_CACHED, "no-record", True),
        ("STS-59", FRESH, REC_B, NOW, Action.FETCH, "id-changed", True),
        ("STS-23", entry("9"), TxtOutcome("record", "10"), NOW, Action.FETCH, "id-changed", True),
        ("STS-60", FRESH, REC_A, T0 + 604800, Action.FETCH, "expired", False),
        ("STS-60", FRESH, REC_A, T0 + 604800 + 5, Action.FETCH, "expired", False),
        ("STS-60", FRESH, REC_B, T0 + 604800 + 5, Action.FETCH, "expired", False),
        ("STS-60", FRESH, NO_REC, T0 + 604800, Action.NO_POLICY, "no-record", False),
        ("STS-60", FRESH, DNS_ERR, T0 + 604800, Action.NO_POLICY, "txt-dns-error", False),
        ("STS-9", None, NO_REC, NOW, Action.NO_POLICY, "no-record", False),
        ("STS-24", None, DNS_ERR, NOW, Action.NO_POLICY, "txt-dns-error", False),
        ("STS-24", None, TxtOutcome("weird"), NOW, Action.NO_POLICY, "txt-dns-error", False),
        ("STS-63", entry(policy=Policy("enforce", ("a.example",), 0)), REC_A, T0, Action.FETCH, "expired", False),
        ("STS-65", entry(policy=NONE), REC_A, NOW, Action.USE_CACHED, "cached", True),
    ],
)
def test_sts_55_60_decide(
    item: str,
    cached: CacheEntry | None,
    txt: TxtOutcome,
    now: float,
    action: Action,
    reason: str,
    uses_entry: bool,
) -> None:
    """STS-9/23/24/55..60/63/65: the cache decision table."""
    decision = decide(cached, txt, now)
    assert (decision.action, decision.reason) == (action, reason), item
    assert decision.entry is (cached if uses_entry else None), item


def test_sts_36_58_backoff_with_fresh_cache() -> None:
    """STS-36/58: id B failed -> keep the cached policy, no refetch of B for 5 minutes, C lifts it."""
    failed = after_fetch_failure(FRESH, "example.com", "B", NOW)
    assert failed is not None
    assert (failed.policy, failed.txt_id, failed.expires_at) == (FRESH.policy, "A", FRESH.expires_at)
    assert (failed.failed_id, failed.failed_at) == ("B", NOW)
    for dt in (0.0, 1.0, FETCH_BACKOFF - 0.001):
        d = decide(failed, REC_B, NOW + dt)
        assert (d.action, d.reason, d.entry) == (Action.USE_CACHED, "fetch-backoff", failed)
    d = decide(failed, REC_B, NOW + FETCH_BACKOFF)
    assert (d.action, d.reason, d.entry) == (Action.FETCH, "id-changed", failed)
    d = decide(failed, TxtOutcome("record", "C"), NOW + 1)
    assert (d.action, d.reason) == (Action.FETCH, "id-changed")
    # the id we already hold is still used from the cache
    assert decide(failed, REC_A, NOW + 1).action is Action.USE_CACHED


def test_sts_36_60_backoff_with_expired_cache() -> None:
    """STS-36/60: expired entry whose refetch failed -> no policy during the back-off, then fetch."""
    expired_at = FRESH.expires_at + 10
    failed = after_fetch_failure(FRESH, "example.com", "A", expired_at)
    assert failed is not None
    d = decide(failed, REC_A, expired_at + 60)
    assert (d.action, d.reason, d.entry) == (Action.NO_POLICY, "fetch-backoff", None)
    d = decide(failed, REC_A, expired_at + FETCH_BACKOFF)
    assert (d.action, d.reason, d.entry) == (Action.FETCH, "expired", None)


def test_sts_36_37_no_cache_failure_returns_none() -> None:
    """STS-36/37: without a cache the failure leaves nothing to store; the caller uses backoff_active."""
    assert after_fetch_failure(None, "example.com", "A", NOW) is None
    assert after_fetch_failure(FRESH, "other.example", "A", NOW) is None


@pytest.mark.parametrize(
    ("failed_id", "failed_at", "txt_id", "now", "active"),
    [
        ("A", T0, "A", T0, True),
        ("A", T0, "A", T0 + FETCH_BACKOFF - 1, True),
        ("A", T0, "A", T0 + FETCH_BACKOFF, False),
        ("A", T0, "B", T0 + 1, False),
        (None, T0, "A", T0 + 1, False),
        ("A", None, "A", T0 + 1, False),
        ("A", T0, "A", T0 - 10, False),  # clock went backwards: don't hold the domain hostage
    ],
)
def test_sts_36_backoff_active(
    failed_id: str | None, failed_at: float | None, txt_id: str, now: float, active: bool
) -> None:
    """STS-36: the 5-minute per-id back-off."""
    assert backoff_active(failed_id, failed_at, txt_id, now) is active


def test_sts_55_59_after_fetch_success() -> None:
    """STS-55/59: the new entry stores txt id, fetch time and expiry = fetch time + max_age."""
    new = after_fetch_success("example.com", "B", TESTING, NOW)
    assert new == CacheEntry("example.com", "B", TESTING, NOW, NOW + 86400)
    assert new.failed_id is None and new.failed_at is None
    assert new.fresh(NOW + 86399.9) and not new.fresh(NOW + 86400)
    # STS-59: a weaker policy replaces a stronger one; the next decision uses it
    assert decide(new, REC_B, NOW + 5).entry is new


def test_sts_63_max_age_zero() -> None:
    """STS-63: a max_age 0 policy is never fresh, so the next message fetches again."""
    zero = after_fetch_success("example.com", "A", Policy("enforce", ("a.example",), 0), NOW)
    assert not zero.fresh(NOW)
    assert decide(zero, REC_A, NOW).action is Action.FETCH


def test_sts_64_expiry_from_original_fetch_time() -> None:
    """STS-64: freshness depends only on the stored times and the `now` given (restart-proof)."""
    stored = entry(at=T0 - 604800 + 10)
    assert stored.fresh(T0) and not stored.fresh(T0 + 10)


# --- STS-61 proactive refresh ----------------------------------------------------------------


@pytest.mark.parametrize("seed", range(20))
def test_sts_61_refresh_after_a_day_for_long_policies(seed: int) -> None:
    """STS-61: max_age 2 days, one day later -> refresh due; right after the fetch -> not."""
    rng = random.Random(seed)
    e = entry(policy=Policy("enforce", ("a.example",), 2 * 86400))
    assert not refresh_due(e, T0 + 1, rng)
    assert not refresh_due(e, T0 + 0.49 * DAY, rng)
    assert refresh_due(e, T0 + DAY, rng)
    assert refresh_due(e, T0 + 1.9 * DAY, rng)


@pytest.mark.parametrize("seed", range(20))
def test_sts_61_refresh_before_expiry_for_short_policies(seed: int) -> None:
    """STS-61: a one-hour policy is refreshed between 50 % and 100 % of its life, never after."""
    rng = random.Random(seed)
    e = entry(policy=Policy("testing", ("a.example",), 3600))
    assert not refresh_due(e, T0 + 1799, rng)
    assert refresh_due(e, T0 + 3599.99, rng)
    assert not refresh_due(e, T0 + 3600, rng)  # expired: refetched on demand instead (STS-60)


def test_sts_61_refresh_is_randomised() -> None:
    """STS-61: different draws give different refresh points within the window."""
    e = entry(policy=Policy("enforce", ("a.example",), 604800))
    at = T0 + 0.75 * REFRESH_HORIZON
    results = {refresh_due(e, at, random.Random(seed)) for seed in range(50)}
    assert results == {True, False}


def test_sts_61_62_no_refresh_during_backoff_or_for_zero_lifetime() -> None:
    """STS-61/36: a failed refresh of the same id waits out the back-off; max_age 0 never refreshes."""
    rng = random.Random(1)
    e = entry(policy=Policy("enforce", ("a.example",), 2 * 86400))
    failed = after_fetch_failure(e, "example.com", "A", T0 + DAY)
    assert failed is not None
    assert not refresh_due(failed, T0 + DAY + 10, rng)
    assert refresh_due(failed, T0 + DAY + FETCH_BACKOFF, rng)
    zero = entry(policy=Policy("none", (), 0))
    assert not refresh_due(zero, T0, rng)


# --- 1G: MX filtering ------------------------------------------------------------------------


def test_sts_74_86_enforce_filters_in_order() -> None:
    """STS-74/86: enforce -> non-matching MX not allowed; order kept; no fallback pass."""
    hosts = ["evil.example.org", "mx1.example.com.", "mail.example.net", "a.b.example.com"]
    assert filter_mx(ENFORCE, hosts) == [
        MxVerdict("evil.example.org", False, True, "sts-mx-mismatch"),
        MxVerdict("mx1.example.com.", True, True, ""),
        MxVerdict("mail.example.net", True, True, ""),
        MxVerdict("a.b.example.com", False, True, "sts-mx-mismatch"),
    ]


def test_sts_81_enforce_no_match_at_all() -> None:
    """STS-81: under enforce no candidate may be allowed when nothing matches."""
    verdicts = filter_mx(ENFORCE, ["x.example.org", "y.example.org"])
    assert not any(v.allowed for v in verdicts)


def test_sts_84_testing_allows_all_but_records_mismatch() -> None:
    """STS-84: testing -> every MX allowed, no TLS requirement, mismatch reason kept for TLS-RPT."""
    assert filter_mx(TESTING, ["evil.example.org", "mx1.example.com"]) == [
        MxVerdict("evil.example.org", True, False, "sts-mx-mismatch"),
        MxVerdict("mx1.example.com", True, False, ""),
    ]


@pytest.mark.parametrize("policy", [None, NONE])
def test_sts_85_none_and_no_policy(policy: Policy | None) -> None:
    """STS-85/9: mode none or no policy -> everything allowed, nothing required or recorded."""
    assert filter_mx(policy, ["a.example", "b.example"]) == [
        MxVerdict("a.example", True, False, ""),
        MxVerdict("b.example", True, False, ""),
    ]
    assert filter_mx(policy, []) == []


def test_sts_73_implicit_mx() -> None:
    """STS-73 [DECISION]: the implicit MX (the domain itself) must match a pattern under enforce."""
    assert filter_mx(Policy("enforce", ("example.com",), 60), ["example.com"])[0].allowed
    assert not filter_mx(ENFORCE, ["example.com"])[0].allowed


# --- 1G/1H: TLS checks -----------------------------------------------------------------------

GOOD = TlsInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384", True, None)
GOOD12 = TlsInfo("TLSv1.2", "ECDHE-RSA-AES128-GCM-SHA256", True, None)


def unverified(error: str | None, version: str | None = "TLSv1.3") -> TlsInfo:
    return TlsInfo(version, "X", False, error)


FAILURES = [
    ("STS-75", False, None, "starttls-not-supported"),
    ("STS-75", False, GOOD, "starttls-not-supported"),
    ("STS-76", True, None, "validation-failure"),
    ("STS-76", True, unverified("sslv3 alert handshake failure", None), "validation-failure"),
    ("STS-76", True, unverified("certificate verify failed: certificate has expired", None), "certificate-expired"),
    ("STS-92", True, unverified("certificate verify failed: certificate has expired"), "certificate-expired"),
    ("STS-92", True, unverified("certificate verify failed: certificate is not yet valid"), "certificate-expired"),
    (
        "STS-77",
        True,
        unverified("certificate verify failed: Hostname mismatch, certificate is not valid for 'mx1.example.com'."),
        "certificate-host-mismatch",
    ),
    ("STS-78", True, unverified("hostname 'mx1.example.com' doesn't match 'other'"), "certificate-host-mismatch"),
    ("STS-92", True, unverified("certificate verify failed: self-signed certificate"), "certificate-not-trusted"),
    ("STS-92", True, unverified("self signed certificate in certificate chain"), "certificate-not-trusted"),
    (
        "STS-92",
        True,
        unverified("certificate verify failed: unable to get local issuer certificate"),
        "certificate-not-trusted",
    ),
    ("STS-92", True, unverified("tlsv1 alert unknown ca"), "certificate-not-trusted"),
    ("STS-92", True, unverified("peer certificate not trusted"), "certificate-not-trusted"),
    ("STS-92", True, unverified("something odd"), "validation-failure"),
    ("STS-92", True, unverified(None), "validation-failure"),
    ("STS-80", True, TlsInfo("TLSv1.1", "X", True, None), "validation-failure"),
    ("STS-80", True, TlsInfo("TLSv1", "X", True, None), "validation-failure"),
    ("STS-80", True, TlsInfo("SSLv3", "X", True, None), "validation-failure"),
    ("STS-80", True, TlsInfo("banana", "X", True, None), "validation-failure"),
]


@pytest.mark.parametrize(("item", "offered", "tls", "result_type"), FAILURES)
def test_sts_75_80_92_enforce_failures(item: str, offered: bool, tls: TlsInfo | None, result_type: str) -> None:
    """STS-75/76/77/78/80/92: enforce -> no MAIL FROM, with the RFC 8460 result type."""
    verdict = check_tls(ENFORCE, offered, tls)
    assert not verdict.ok, item
    assert verdict.result_type == result_type, item
    assert verdict.reason, item


@pytest.mark.parametrize(("item", "offered", "tls", "result_type"), FAILURES)
def test_sts_84_testing_records_but_allows(item: str, offered: bool, tls: TlsInfo | None, result_type: str) -> None:
    """STS-84: testing -> the same failures are recorded for TLS-RPT but never block delivery."""
    verdict = check_tls(TESTING, offered, tls)
    assert verdict.ok, item
    assert verdict.result_type == result_type, item


@pytest.mark.parametrize("policy", [ENFORCE, TESTING])
@pytest.mark.parametrize("tls", [GOOD, GOOD12, TlsInfo("TLSv1.4", "X", True, None)])
def test_sts_80_93_good_sessions(policy: Policy, tls: TlsInfo) -> None:
    """STS-80/93: verified TLS 1.2 or newer is a policy-compliant session."""
    assert check_tls(policy, True, tls) == TlsVerdict(True, None, "")


@pytest.mark.parametrize("policy", [None, NONE])
@pytest.mark.parametrize("offered", [True, False])
@pytest.mark.parametrize("tls", [None, unverified("certificate has expired"), TlsInfo("TLSv1", "X", True, None)])
def test_sts_85_none_never_fails(policy: Policy | None, offered: bool, tls: TlsInfo | None) -> None:
    """STS-85/65: mode none or no policy -> always ok, nothing to report."""
    assert check_tls(policy, offered, tls) == TlsVerdict(True, None, "")


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        ("CERTIFICATE HAS EXPIRED", "certificate-expired"),
        ("Hostname mismatch", "certificate-host-mismatch"),
        ("name does not match", "certificate-host-mismatch"),
        ("unable to get issuer certificate", "certificate-not-trusted"),
        ("unable to verify the first certificate", "certificate-not-trusted"),
        ("", "validation-failure"),
        (None, "validation-failure"),
    ],
)
def test_sts_92_cert_result_type(error: str | None, expected: str) -> None:
    """STS-92: certificate error text -> RFC 8460 result type (case-insensitive)."""
    assert cert_result_type(error) == expected


@pytest.mark.parametrize(
    ("version", "ok"),
    [
        ("TLSv1.3", True),
        ("TLSv1.2", True),
        ("TLSv2", True),
        ("TLSv1.1", False),
        ("TLSv1", False),
        ("SSLv3", False),
        (None, False),
        ("", False),
        ("tlsv1.3", False),
    ],
)
def test_sts_80_tls_version_floor(version: str | None, ok: bool) -> None:
    """STS-80 [DECISION]: enforce needs TLS 1.2 or newer."""
    assert tls_version_ok(version) is ok
