"""RFC 7672 decisions: does DANE apply to one MX host, and what does its TLSA RRset demand? (DANE-1..4)

Rule: pure. The lookup adapter (`mta.dane.lookup`) asks DNS only what these functions say to ask
and hands the answers back here; it decides nothing itself.

- DANE-1: only with DANE enabled, a resolver whose AD bit we trust, a secure MX RRset (or secure
  implicit-MX address records) and secure address records of the host. Anything insecure: no
  TLSA query at all, so a domain without DNSSEC never waits for one (the maddy #287 / Stalwart
  #1255 failure mode: TLSA lookups in unsigned zones that time out or SERVFAIL).
- DANE-2: TLSA at `_<port>._tcp.<base>`; bases in order: the secure CNAME-expanded host name,
  then the MX host name itself (RFC 7672 §2.2.2). A secure, non-empty RRset decides.
- DANE-3: a failed TLSA lookup (bogus data, SERVFAIL, timeout) in a signed zone makes the host
  unusable, never "no TLSA".
- DANE-4: a secure RRset with no usable record: TLS mandatory but unauthenticated.
"""

from __future__ import annotations

from dataclasses import dataclass

from mta.dane.records import TlsaAnswer, TlsaRecord

NOT_APPLICABLE = "none"  # DANE does not apply: other policies (MTA-STS, opportunistic) decide
BOGUS = "bogus"  # DANE-3: the host must not be used
UNUSABLE = "unusable"  # DANE-4: STARTTLS mandatory, certificate not checked by DANE
AUTHENTICATE = "authenticate"  # DANE-2/5: STARTTLS mandatory, certificate must match a record


@dataclass(frozen=True)
class DaneVerdict:
    """What DANE says about one MX host."""

    kind: str
    reason: str = ""
    records: tuple[TlsaRecord, ...] = ()
    base: str = ""  # TLSA base domain: the SNI to send (DANE-6)
    names: tuple[str, ...] = ()  # reference identifiers for DANE-TA(2) name checks (DANE-5)

    @property
    def applies(self) -> bool:
        return self.kind != NOT_APPLICABLE

    @property
    def policy_strings(self) -> tuple[str, ...]:
        """The TLSA RRset as RFC 8460 §4.4 `policy-string` elements."""
        return tuple(r.text() for r in self.records)


def precheck(*, enabled: bool, mx_secure: bool, addresses_secure: bool) -> DaneVerdict | None:
    """A not-applicable verdict when no TLSA lookup may be made (DANE-1), else None (go and look)."""
    if not enabled:
        return DaneVerdict(NOT_APPLICABLE, "DANE disabled")
    if not mx_secure:
        return DaneVerdict(NOT_APPLICABLE, "MX RRset not DNSSEC-secure")
    if not addresses_secure:
        return DaneVerdict(NOT_APPLICABLE, "MX host address records not DNSSEC-secure")
    return None


def tlsa_bases(host: str, canonical: str) -> list[str]:
    """Candidate TLSA base domains, best first (RFC 7672 §2.2.2); `canonical` is the secure CNAME target."""
    bases = [canonical] if canonical and canonical != host else []
    return [*bases, host]


def reference_names(host: str, canonical: str) -> tuple[str, ...]:
    """Names a DANE-TA(2) leaf may carry: the MX host and its secure CNAME target (DANE-5)."""
    return (host, canonical) if canonical and canonical != host else (host,)


def tlsa_owner(base: str, port: int) -> str:
    return f"_{port}._tcp.{base}"


def from_answer(base: str, names: tuple[str, ...], answer: TlsaAnswer) -> DaneVerdict | None:
    """The verdict one TLSA answer settles, or None to try the next base (no secure records here)."""
    if not answer.records or not answer.secure:
        return None  # nothing, or an insecure RRset that must not be used (DANE-1)
    if not any(r.usable for r in answer.records):
        return DaneVerdict(UNUSABLE, "no usable TLSA record (DANE-4)", answer.records, base, names)
    return DaneVerdict(AUTHENTICATE, "", answer.records, base, names)


def from_failure(base: str, names: tuple[str, ...], error: str) -> DaneVerdict:
    """DANE-3: a TLSA lookup that failed in a signed zone makes the host unusable."""
    return DaneVerdict(BOGUS, f"TLSA lookup for {base} failed in a signed zone: {error}", (), base, names)


def none_found() -> DaneVerdict:
    return DaneVerdict(NOT_APPLICABLE, "no TLSA records")
