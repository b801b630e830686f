"""Transport policies over one seam: MTA-STS and DANE verdicts -> one verdict per MX host (DANE-7, STS-90).

Rule: pure. `mta.sts.decide.filter_mx` and `mta.dane.decide` each turn DNS facts into their own
per-host verdict; `combine` merges them into a `HostVerdict` that says, without naming a policy
in its mechanics, whether the host may be dialled, whether STARTTLS is mandatory and how its
certificate is judged (PKIX for the MX name, TLSA match, or not at all). The delivery attempt
applies HostVerdicts only.

Precedence [DECISION] (RFC 8461 §2, DANE-7, STS-90), per MX host:
- an MTA-STS `enforce` policy still filters MX names: a host outside its `mx` patterns is never
  dialled, whatever DANE says;
- DANE that applies (secure, usable TLSA records) decides certificate acceptance: STARTTLS is
  mandatory and the chain must match a record; a mismatch is never rescued by a PKIX/MTA-STS
  success, and the host is skipped like an unreachable one (next MX, else defer 4.7.5);
- a TLSA lookup that failed in a signed zone (DANE-3) makes the host unusable;
- secure TLSA records that are all unusable (DANE-4): STARTTLS mandatory; the certificate is then
  judged by MTA-STS `enforce` if there is such a policy, else not at all;
- otherwise MTA-STS (enforce/testing) or, without a policy, opportunistic TLS as before.

TLS-RPT: a session is reported under every policy that applied to the host (RFC 8460 §4.4): the
STS view uses the PKIX judgement of the same chain, the TLSA view the DANE judgement.
"""

from __future__ import annotations

from dataclasses import dataclass

from mta.dane.decide import AUTHENTICATE, BOGUS, DaneVerdict
from mta.dane.records import TlsaRecord
from mta.model import TlsInfo
from mta.sts.decide import MxVerdict, TlsVerdict, check_tls, tls_failure
from mta.sts.policy import Policy

MAY, REQUIRE, VERIFY = "may", "require", "verify"  # STARTTLS: optional / mandatory / mandatory + PKIX in OpenSSL
PKIX, TLSA, NO_CHECK = "pkix", "tlsa", "none"  # how the certificate is judged
DANE, MTA_STS, NONE = "dane", "mta-sts", "none"  # which policy governed (the log's "policy" field)


@dataclass(frozen=True)
class HostVerdict:
    """How to treat one MX host; see the module rule."""

    host: str
    allowed: bool
    tls: str  # MAY | REQUIRE | VERIFY
    cert: str  # PKIX | TLSA | NO_CHECK
    enforced: bool  # a failed check forbids MAIL FROM on the session (next host, never plaintext)
    governed_by: str  # DANE | MTA_STS | NONE
    reason: str = ""  # not allowed: why; allowed: an STS testing-mode MX mismatch to report (STS-84)
    result_type: str | None = None  # not allowed: the TLS-RPT result type
    sni: str | None = None  # None: the MX host name (STS-79); DANE: the TLSA base domain (DANE-6)
    names: tuple[str, ...] = ()  # DANE-TA reference names
    tlsa: tuple[TlsaRecord, ...] = ()
    min_tls12: bool = False  # STS-80
    sts_policy: Policy | None = None  # an MTA-STS policy (testing/enforce) applied: report under it
    dane: DaneVerdict | None = None  # DANE applied: report under the TLSA RRset

    @property
    def pkix_view_needed(self) -> bool:
        """Whether the STS report needs a PKIX judgement the session itself did not make."""
        return self.sts_policy is not None and self.cert != PKIX


@dataclass(frozen=True)
class PolicyResult:
    """One TLS-RPT record: under the STS policy (`tlsa` None) or under a TLSA RRset."""

    policy: Policy | None
    tlsa: tuple[str, ...] | None
    success: bool
    result_type: str | None
    reason: str


def combine(host: str, sts: MxVerdict, policy: Policy | None, dane: DaneVerdict | None,
            *, verify: bool = False) -> HostVerdict:
    """The HostVerdict of one MX host (module rule); `verify`: PKIX required anyway (verified relayhost)."""
    sts_applies = policy is not None and policy.mode in ("enforce", "testing")
    sts_enforce = sts_applies and policy is not None and policy.mode == "enforce"
    applied_sts = policy if sts_applies else None
    applied_dane = dane if dane is not None and dane.applies else None
    if not sts.allowed:  # STS-74, DANE-7: enforce filters MX names before anything else
        return HostVerdict(host, False, VERIFY, PKIX, True, MTA_STS, sts.reason or "sts-mx-mismatch",
                           "validation-failure", sts_policy=applied_sts)
    if applied_dane is not None and applied_dane.kind == BOGUS:  # DANE-3
        return HostVerdict(host, False, REQUIRE, TLSA, True, DANE, applied_dane.reason, "dnssec-invalid",
                           sni=applied_dane.base, names=applied_dane.names, sts_policy=applied_sts,
                           dane=applied_dane)
    if applied_dane is not None and applied_dane.kind == AUTHENTICATE:  # DANE-2, DANE-5, DANE-6, STS-90
        return HostVerdict(host, True, REQUIRE, TLSA, True, DANE, sts.reason, sni=applied_dane.base,
                           names=applied_dane.names, tlsa=applied_dane.records, sts_policy=applied_sts,
                           dane=applied_dane)
    pkix_required = sts.require_tls or verify
    governed = MTA_STS if sts_applies else NONE
    if applied_dane is not None:  # DANE-4: all records unusable -> TLS mandatory
        if pkix_required:
            return HostVerdict(host, True, VERIFY, PKIX, True, governed, sts.reason, min_tls12=sts_enforce,
                               sts_policy=applied_sts, dane=applied_dane)
        # [DECISION] logged as governed by DANE: it made TLS mandatory, nothing judged the certificate.
        return HostVerdict(host, True, REQUIRE, PKIX, False, DANE, sts.reason, sts_policy=applied_sts,
                           dane=applied_dane)
    return HostVerdict(host, True, VERIFY if pkix_required else MAY, PKIX, pkix_required, governed, sts.reason,
                       min_tls12=sts_enforce, sts_policy=applied_sts)


def judge_session(v: HostVerdict, starttls_offered: bool, tls: TlsInfo | None) -> TlsVerdict:
    """May MAIL FROM follow on this session? `tls.verified` is the judgement `v.cert` asked for."""
    if not v.enforced:
        return TlsVerdict(True, None, "")
    failure = tls_failure(starttls_offered, tls, check_cert=v.cert != NO_CHECK, check_version=v.min_tls12)
    if failure is None:
        return TlsVerdict(True, None, "")
    return TlsVerdict(False, *failure)


def _dane_view(v: HostVerdict, starttls_offered: bool, tls: TlsInfo | None) -> tuple[str, str] | None:
    return tls_failure(starttls_offered, tls, check_cert=v.cert == TLSA, check_version=False)


def session_results(v: HostVerdict, starttls_offered: bool, tls: TlsInfo | None,
                    pkix_tls: TlsInfo | None = None) -> list[PolicyResult]:
    """One PolicyResult per policy that applied to a session that got as far as TLS (or not).

    `pkix_tls`: the PKIX judgement of the same chain when the session was judged by TLSA
    (`v.pkix_view_needed`); otherwise `tls` serves both views.
    """
    out: list[PolicyResult] = []
    if v.sts_policy is not None:
        verdict = check_tls(v.sts_policy, starttls_offered, pkix_tls if v.pkix_view_needed else tls)
        result_type, reason = verdict.result_type, verdict.reason
        if result_type is None and v.reason:
            result_type, reason = "validation-failure", v.reason  # STS-84/92: testing-mode MX mismatch
        out.append(PolicyResult(v.sts_policy, None, result_type is None, result_type, reason))
    if v.dane is not None:
        failure = _dane_view(v, starttls_offered, tls)
        out.append(PolicyResult(None, v.dane.policy_strings, failure is None,
                                failure[0] if failure else None, failure[1] if failure else ""))
    if not out:  # no policy: counted only as "no-policy-found" with record_all_sessions
        out.append(PolicyResult(None, None, True, None, ""))
    return out


def refusal_results(v: HostVerdict) -> list[PolicyResult]:
    """What to report for a host that is not dialled (`allowed` False)."""
    if v.governed_by == DANE and v.dane is not None:
        return [PolicyResult(None, v.dane.policy_strings, False, v.result_type, v.reason)]
    return [PolicyResult(v.sts_policy, None, False, v.result_type, v.reason)]


def failure_results(v: HostVerdict, result_type: str, reason: str) -> list[PolicyResult]:
    """What to report when mandatory TLS could not be had at all (no STARTTLS, handshake failed)."""
    out = []
    if v.sts_policy is not None or v.dane is None:
        out.append(PolicyResult(v.sts_policy, None, False, result_type, reason))
    if v.dane is not None:
        out.append(PolicyResult(None, v.dane.policy_strings, False, result_type, reason))
    return out
