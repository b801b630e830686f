"""The transport-policy seam (DANE-7, STS-90): MTA-STS and DANE verdicts combined per MX host; pure, table-driven."""

from __future__ import annotations

import pytest

from mta.dane.decide import AUTHENTICATE, BOGUS, NOT_APPLICABLE, UNUSABLE, DaneVerdict
from mta.dane.records import TlsaRecord
from mta.delivery.transport import (
    DANE,
    MAY,
    MTA_STS,
    NO_CHECK,
    NONE,
    PKIX,
    REQUIRE,
    TLSA,
    VERIFY,
    HostVerdict,
    combine,
    failure_results,
    judge_session,
    refusal_results,
    session_results,
)
from mta.model import TlsInfo
from mta.sts.decide import filter_mx
from mta.sts.policy import Policy

HOST = "mx1.dane.test"
REC = TlsaRecord(3, 1, 1, b"\x01" * 32)
DANE_STATES = {
    "absent": None,
    "n/a": DaneVerdict(NOT_APPLICABLE, "no TLSA records"),
    "bogus": DaneVerdict(BOGUS, "SERVFAIL", (), HOST, (HOST,)),
    "unusable": DaneVerdict(UNUSABLE, "", (TlsaRecord(1, 1, 1, b"\x01" * 32),), HOST, (HOST,)),
    "auth": DaneVerdict(AUTHENTICATE, "", (REC,), "target.hoster.test", (HOST, "target.hoster.test")),
}


def policy(mode: str, patterns: tuple[str, ...] = ("*.dane.test",)) -> Policy | None:
    if mode == "absent":
        return None
    return Policy(mode=mode, mx=patterns if mode != "none" else (), max_age=86400)


# (sts mode, host matches, dane state) -> (allowed, tls, cert, enforced, governed_by)
TABLE = [
    ("absent", True, "absent", (True, MAY, PKIX, False, NONE)),
    ("absent", True, "n/a", (True, MAY, PKIX, False, NONE)),
    ("absent", True, "bogus", (False, REQUIRE, TLSA, True, DANE)),        # DANE-3
    ("absent", True, "unusable", (True, REQUIRE, PKIX, False, DANE)),     # DANE-4
    ("absent", True, "auth", (True, REQUIRE, TLSA, True, DANE)),          # DANE-2
    ("none", True, "auth", (True, REQUIRE, TLSA, True, DANE)),
    ("none", True, "absent", (True, MAY, PKIX, False, NONE)),
    ("testing", True, "absent", (True, MAY, PKIX, False, MTA_STS)),
    ("testing", False, "absent", (True, MAY, PKIX, False, MTA_STS)),      # STS-84: reported only
    ("testing", True, "auth", (True, REQUIRE, TLSA, True, DANE)),         # DANE-7: testing never rescues
    ("testing", False, "auth", (True, REQUIRE, TLSA, True, DANE)),
    ("testing", True, "bogus", (False, REQUIRE, TLSA, True, DANE)),
    ("testing", True, "unusable", (True, REQUIRE, PKIX, False, DANE)),
    ("enforce", True, "absent", (True, VERIFY, PKIX, True, MTA_STS)),
    ("enforce", True, "n/a", (True, VERIFY, PKIX, True, MTA_STS)),
    ("enforce", False, "absent", (False, VERIFY, PKIX, True, MTA_STS)),   # STS-74
    ("enforce", False, "auth", (False, VERIFY, PKIX, True, MTA_STS)),     # DANE-7: enforce still filters names
    ("enforce", False, "bogus", (False, VERIFY, PKIX, True, MTA_STS)),
    ("enforce", True, "auth", (True, REQUIRE, TLSA, True, DANE)),         # STS-90: DANE decides the cert
    ("enforce", True, "bogus", (False, REQUIRE, TLSA, True, DANE)),
    ("enforce", True, "unusable", (True, VERIFY, PKIX, True, MTA_STS)),   # DANE-4 + enforce: PKIX
]


@pytest.mark.parametrize(("mode", "matches", "dane", "expected"), TABLE)
def test_dane_7_sts_90_combine(mode: str, matches: bool, dane: str, expected: tuple[object, ...]) -> None:
    pol = policy(mode, ("*.dane.test",) if matches else ("other.test",))
    sts = filter_mx(pol, [HOST])[0]
    v = combine(HOST, sts, pol, DANE_STATES[dane])
    assert (v.allowed, v.tls, v.cert, v.enforced, v.governed_by) == expected
    assert (v.sts_policy is not None) == (mode in ("testing", "enforce"))
    if sts.allowed:  # a host the policy filters out is never looked up or dialled
        assert (v.dane is not None) == (dane in ("bogus", "unusable", "auth"))


def test_dane_6_sni_and_names_are_the_tlsa_base() -> None:
    v = combine(HOST, filter_mx(None, [HOST])[0], None, DANE_STATES["auth"])
    assert v.sni == "target.hoster.test" and v.names == (HOST, "target.hoster.test") and v.tlsa == (REC,)
    plain = combine(HOST, filter_mx(None, [HOST])[0], None, None)
    assert plain.sni is None


def test_verified_relayhost_requires_pkix() -> None:
    v = combine("smart.test", filter_mx(None, ["smart.test"])[0], None, None, verify=True)
    assert (v.tls, v.cert, v.enforced, v.governed_by) == (VERIFY, PKIX, True, NONE)


GOOD = TlsInfo("TLSv1.3", "X", True, None)
BAD_CERT = TlsInfo("TLSv1.3", "X", False, "tlsa-invalid: no TLSA record matches")
OLD = TlsInfo("TLSv1.1", "X", True, None)


def verdict(mode: str, dane: str, matches: bool = True) -> HostVerdict:
    pol = policy(mode, ("*.dane.test",) if matches else ("other.test",))
    return combine(HOST, filter_mx(pol, [HOST])[0], pol, DANE_STATES[dane])


@pytest.mark.parametrize(("mode", "dane", "offered", "tls", "ok", "result_type"), [
    ("absent", "absent", False, None, True, None),
    ("absent", "absent", True, BAD_CERT, True, None),
    ("testing", "absent", True, BAD_CERT, True, None),
    ("enforce", "absent", True, GOOD, True, None),
    ("enforce", "absent", True, OLD, False, "validation-failure"),         # STS-80
    ("enforce", "absent", False, None, False, "starttls-not-supported"),
    ("absent", "auth", True, GOOD, True, None),
    ("absent", "auth", True, OLD, True, None),                             # no STS-80 rule under DANE
    ("absent", "auth", True, BAD_CERT, False, "tlsa-invalid"),             # DANE-2
    ("enforce", "auth", True, BAD_CERT, False, "tlsa-invalid"),            # DANE-7
    ("testing", "auth", True, BAD_CERT, False, "tlsa-invalid"),
    ("absent", "auth", False, None, False, "starttls-not-supported"),
    ("absent", "unusable", True, BAD_CERT, True, None),                    # DANE-4: unauthenticated
])
def test_dane_2_7_judge_session(mode: str, dane: str, offered: bool, tls: TlsInfo | None, ok: bool,
                                result_type: str | None) -> None:
    judged = judge_session(verdict(mode, dane), offered, tls)
    assert (judged.ok, judged.result_type) == (ok, result_type)


def test_session_reported_under_each_applied_policy() -> None:
    v = verdict("enforce", "auth")
    pkix_ok = GOOD
    results = session_results(v, True, BAD_CERT, pkix_ok)
    assert [(r.tlsa is None, r.success, r.result_type) for r in results] == [
        (True, True, None),                 # the STS view: the chain is PKIX-valid
        (False, False, "tlsa-invalid")]     # the TLSA view: governs, fails
    assert results[1].tlsa == ("3 1 1 " + "01" * 32,)


def test_session_results_without_policy_is_one_unpolicied_record() -> None:
    results = session_results(verdict("absent", "absent"), True, GOOD)
    assert [(r.policy, r.tlsa, r.success) for r in results] == [(None, None, True)]


def test_session_results_testing_mismatch_and_unusable_tlsa() -> None:
    untrusted = TlsInfo("TLSv1.3", "X", False, "certificate verify failed: unable to get local issuer certificate")
    results = session_results(verdict("testing", "unusable", matches=False), True, untrusted)
    assert [(r.tlsa is None, r.success, r.result_type) for r in results] == [
        (True, False, "certificate-not-trusted"), (False, True, None)]  # DANE-4: TLS is all DANE asks
    results = session_results(verdict("testing", "unusable", matches=False), True, GOOD)
    assert next((r.success, r.result_type, r.reason) for r in results) == (False, "validation-failure",
                                                                          "sts-mx-mismatch")


def test_dane_3_refusal_and_failure_results() -> None:
    bogus = verdict("testing", "bogus")
    assert [(r.tlsa, r.result_type) for r in refusal_results(bogus)] == [((), "dnssec-invalid")]
    mismatch = verdict("enforce", "auth", matches=False)
    assert [(r.policy is not None, r.result_type, r.reason) for r in refusal_results(mismatch)] == [
        (True, "validation-failure", "sts-mx-mismatch")]
    both = failure_results(verdict("enforce", "auth"), "starttls-not-supported", "x")
    assert [(r.tlsa is None, r.result_type) for r in both] == [(True, "starttls-not-supported"),
                                                                (False, "starttls-not-supported")]
    assert len(failure_results(verdict("absent", "auth"), "starttls-not-supported", "x")) == 1


def test_no_check_constant_exists_for_completeness() -> None:
    assert NO_CHECK == "none"
