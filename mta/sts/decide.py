"""RFC 8461 decisions: which policy applies (§3.3, §5.1) and what it means for each MX and session (§4, §5).

Rule: a valid cached policy is only ever replaced by a newer valid policy or by expiry; a failed
or missing discovery never removes it (STS-56/57/58). Without a usable cache every discovery
failure means "no policy" (STS-37). Under `enforce` a failing MX is skipped like an unreachable
one and the caller goes on to the next candidate (STS-74..76, STS-86); under `testing` the same
failures are only recorded for TLS-RPT (STS-84); `none` behaves as no policy (STS-85).

Pure: time comes in as `now` (float epoch seconds), randomness as `rng`.
"""

from __future__ import annotations

import enum
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

from mta.model import TlsInfo
from mta.sts.policy import Policy

FETCH_BACKOFF = 300.0  # STS-36: no refetch for the same id within 5 minutes of a failure
REFRESH_HORIZON = 86400.0  # STS-61: refresh at the latest a day after fetching (RFC suggests daily)
MIN_TLS = (1, 2)  # STS-80 [DECISION]: under enforce, TLS 1.2 or newer

_TLS_VERSION = re.compile(r"TLSv(\d{1,3})(?:\.(\d{1,3}))?")


@dataclass(frozen=True)
class CacheEntry:
    """A cached policy with its TXT id, lifetime and the last failed fetch (for the back-off)."""

    domain: str
    txt_id: str
    policy: Policy
    fetched_at: float
    expires_at: float
    failed_id: str | None = None
    failed_at: float | None = None

    def fresh(self, now: float) -> bool:
        """Unexpired (STS-60); a `max_age: 0` entry is never fresh after its fetch (STS-63)."""
        return now < self.expires_at


@dataclass(frozen=True)
class TxtOutcome:
    """What the TXT lookup produced: "record" (with id), "none" or "error" (temporary DNS failure)."""

    kind: str
    id: str | None = None
    reason: str = ""


class Action(enum.Enum):
    USE_CACHED = "use-cached"
    FETCH = "fetch"
    NO_POLICY = "no-policy"


@dataclass(frozen=True)
class Decision:
    """What to do; `entry` is the fresh cached entry to apply now, or to fall back on if a FETCH fails."""

    action: Action
    entry: CacheEntry | None
    reason: str


def backoff_active(failed_id: str | None, failed_at: float | None, txt_id: str, now: float) -> bool:
    """Whether a fetch for `txt_id` failed less than FETCH_BACKOFF ago (STS-36).

    A different id lifts the back-off at once; a clock that went backwards lifts it too, so a
    clock jump can never hold the domain without a policy for longer than the back-off.
    """
    if failed_id is None or failed_at is None or failed_id != txt_id:
        return False
    return 0.0 <= now - failed_at < FETCH_BACKOFF


def decide(cached: CacheEntry | None, txt: TxtOutcome, now: float) -> Decision:
    """Choose between the cache, a fetch and no policy (RFC 8461 §3.3, §5.1 step 1)."""
    fresh = cached if cached is not None and cached.fresh(now) else None
    if txt.kind != "record" or not txt.id:
        # STS-24/56/57: no live record; a fresh cache still applies, else no policy (STS-9).
        reason = "no-record" if txt.kind in ("none", "record") else "txt-dns-error"
        return Decision(Action.USE_CACHED if fresh else Action.NO_POLICY, fresh, reason)
    if fresh is not None and fresh.txt_id == txt.id:
        return Decision(Action.USE_CACHED, fresh, "cached")  # STS-55: no HTTPS request
    if cached is not None and backoff_active(cached.failed_id, cached.failed_at, txt.id, now):
        # STS-36/58: keep what we have (a fresh cache) or go without, but don't refetch yet.
        return Decision(Action.USE_CACHED if fresh else Action.NO_POLICY, fresh, "fetch-backoff")
    if fresh is not None:
        reason = "id-changed"  # STS-23/59: ids are only ever compared for equality
    elif cached is not None:
        reason = "expired"  # STS-60: an expired policy is refetched even with the same id
    else:
        reason = "no-cache"
    return Decision(Action.FETCH, fresh, reason)


def after_fetch_success(domain: str, txt_id: str, policy: Policy, now: float) -> CacheEntry:
    """The new cache entry: replaces the old one even if weaker (STS-59), lifetime from max_age."""
    return CacheEntry(domain, txt_id, policy, now, now + policy.max_age)


def after_fetch_failure(cached: CacheEntry | None, domain: str, txt_id: str, now: float) -> CacheEntry | None:
    """Remember the failed id on the cached entry, keeping its policy and expiry (STS-58).

    Without a cached entry there is nothing to keep: returns None and the caller remembers
    (txt_id, now) itself for `backoff_active`. `domain` names the entry the caller means.
    """
    if cached is None or cached.domain != domain:
        return None
    return replace(cached, failed_id=txt_id, failed_at=now)


def refresh_due(entry: CacheEntry, now: float, rng: random.Random) -> bool:
    """Whether to refetch a still-fresh entry proactively (STS-61).

    The refresh point is drawn in [50 %, 100 %) of min(lifetime, one day) after the fetch,
    so long-lived policies are refreshed at least daily and short ones before they expire,
    and many entries don't all refresh at the same moment. Each call draws anew, so the
    refresh lands somewhere in that window and is certain by its end. Never for expired
    entries (those are refetched on demand, STS-60), nor while a fetch of the same id is in
    its back-off (STS-36).
    """
    if not entry.fresh(now):
        return False
    if backoff_active(entry.failed_id, entry.failed_at, entry.txt_id, now):
        return False
    lifetime = entry.expires_at - entry.fetched_at
    if not lifetime > 0:
        return False
    point = entry.fetched_at + min(lifetime, REFRESH_HORIZON) * rng.uniform(0.5, 1.0)
    return now >= point


@dataclass(frozen=True)
class MxVerdict:
    """Whether we may connect to one MX and whether it must then give us verified TLS."""

    host: str
    allowed: bool
    require_tls: bool
    reason: str


def filter_mx(policy: Policy | None, hosts: Sequence[str]) -> list[MxVerdict]:
    """One verdict per candidate, in the caller's order (STS-86: no filtered-then-unfiltered pass).

    enforce: a host matching no pattern must not be contacted (STS-74); every allowed host needs
    verified TLS. testing: everything allowed, mismatches carry a reason for TLS-RPT (STS-84).
    none / no policy: everything allowed, no reason (STS-85).
    """
    verdicts: list[MxVerdict] = []
    for host in hosts:
        if policy is None or policy.mode not in ("enforce", "testing"):
            verdicts.append(MxVerdict(host, True, False, ""))
            continue
        reason = "" if policy.allows(host) else "sts-mx-mismatch"  # STS-92 [DECISION]
        if policy.mode == "enforce":
            verdicts.append(MxVerdict(host, not reason, True, reason))
        else:
            verdicts.append(MxVerdict(host, True, False, reason))
    return verdicts


@dataclass(frozen=True)
class TlsVerdict:
    """Whether MAIL FROM may follow on this session, and the TLS-RPT result type of any failure."""

    ok: bool
    result_type: str | None
    reason: str


# STS-92: certificate error text (OpenSSL's verify messages) -> RFC 8460 §4.3 result type.
_CERT_ERRORS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("tlsa-invalid", ("tlsa-invalid",)),  # DANE: mta.dane.verify's texts start with their result type
    ("certificate-expired", ("expired", "not yet valid")),
    ("certificate-host-mismatch", ("hostname", "mismatch", "doesn't match", "does not match")),
    (
        "certificate-not-trusted",
        (
            "self signed",
            "self-signed",
            "unable to get local issuer",
            "unable to get issuer",
            "unable to verify the first certificate",
            "not trusted",
            "unknown ca",
        ),
    ),
)


def cert_result_type(error: str | None) -> str:
    """The TLS-RPT result type for a certificate verification error text (STS-92)."""
    text = (error or "").lower()
    for result_type, needles in _CERT_ERRORS:
        if any(needle in text for needle in needles):
            return result_type
    return "validation-failure"


def tls_version_ok(version: str | None) -> bool:
    """TLS 1.2 or newer (STS-80); SSL, unknown or missing versions fail."""
    m = _TLS_VERSION.fullmatch(version or "")
    if m is None:
        return False
    return (int(m.group(1)), int(m.group(2) or 0)) >= MIN_TLS


def tls_failure(starttls_offered: bool, tls: TlsInfo | None, *, check_cert: bool = True,
                check_version: bool = True) -> tuple[str, str] | None:
    """(result type, reason) of the first policy check this session fails, or None.

    `tls.verified` is whatever judged the certificate (PKIX for MTA-STS, TLSA for DANE);
    `check_cert=False` asks only for an encrypted session (DANE-4), `check_version=False` skips
    STS-80's TLS 1.2 minimum (an MTA-STS rule, not a DANE one)."""
    if not starttls_offered:
        return "starttls-not-supported", "starttls-not-supported"  # STS-75
    if tls is None or tls.version is None:
        # The handshake failed; its error text (if any) may still name a certificate problem.
        error = tls.error if tls is not None else None
        return cert_result_type(error), f"tls-handshake-failed: {error}" if error else "tls-handshake-failed"
    if check_cert and not tls.verified:
        result_type = cert_result_type(tls.error)  # STS-76/77/78
        return result_type, f"{result_type}: {tls.error}" if tls.error else result_type
    if check_version and not tls_version_ok(tls.version):
        return "validation-failure", f"tls-version-too-old: {tls.version}"  # STS-80
    return None


def check_tls(policy: Policy | None, starttls_offered: bool, tls: TlsInfo | None) -> TlsVerdict:
    """Judge the TLS a session actually got against the policy (RFC 8461 §4.2, §5).

    enforce: any failure forbids MAIL FROM on this connection (no plaintext retry, STS-76).
    testing: always ok, failures carry a result type for TLS-RPT (STS-84).
    none / no policy: always ok, nothing recorded (STS-85).
    """
    if policy is None or policy.mode not in ("enforce", "testing"):
        return TlsVerdict(True, None, "")
    failure = tls_failure(starttls_offered, tls)
    if failure is None:
        return TlsVerdict(True, None, "")
    result_type, reason = failure
    return TlsVerdict(policy.mode != "enforce", result_type, reason)
