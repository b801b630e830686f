"""Does a presented certificate chain match a TLSA RRset? (RFC 7672 §3.1, RFC 6698 §2.1, DANE-5)

Rule: pure (time comes in as `now`); certificates are parsed, hashed and chained with the
`cryptography` package, never by hand.

- DANE-EE(3): the leaf (its full DER, selector 0, or its SubjectPublicKeyInfo, selector 1) must
  match; names and validity dates are ignored (RFC 7672 §3.1.1), so a self-signed or expired
  leaf pinned by a 3 x x record is fine.
- DANE-TA(2): some certificate of the presented chain must match; it becomes the only trust
  anchor, the leaf must chain to it through the presented intermediates (signatures, CA basic
  constraints, validity at `now`), and the leaf must carry a DNS-ID for one of the reference
  names (the MX host, and its secure CNAME target, RFC 7672 §3.2.2). A leaf that itself matches
  a 2 x x record is its own anchor: only the name is checked.
- PKIX-TA(0)/PKIX-EE(1), unknown parameters and malformed digests are unusable (records.usable)
  and never match anything.

Result types follow RFC 8460 §4.3: no usable record matched -> `tlsa-invalid`; an anchor matched
but the leaf names another host -> `certificate-host-mismatch`; expired/not yet valid in the
anchored chain -> `certificate-expired`; anything else wrong with the chain ->
`validation-failure`.
"""

from __future__ import annotations

import datetime
import hmac
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.verification import Criticality, ExtensionPolicy, PolicyBuilder, Store, VerificationError

from mta.dane.records import CERT, DANE_EE, DANE_TA, FULL, SHA2_256, SHA2_512, TlsaRecord
from mta.net.tls import dns_id_matches


@dataclass(frozen=True)
class DaneCheck:
    """The outcome of matching one chain against one TLSA RRset."""

    ok: bool
    result_type: str | None = None  # RFC 8460 result type of a failure
    reason: str = ""
    matched: TlsaRecord | None = None


def selected_bytes(cert: x509.Certificate, selector: int) -> bytes:
    """What a record with `selector` is about: the whole certificate or its SubjectPublicKeyInfo."""
    if selector == CERT:
        return cert.public_bytes(Encoding.DER)
    return cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def association(data: bytes, mtype: int) -> bytes:
    """The association data for `data` under matching type `mtype` (0 full, 1 SHA2-256, 2 SHA2-512)."""
    if mtype == FULL:
        return data
    if mtype not in (SHA2_256, SHA2_512):
        raise ValueError(f"unknown TLSA matching type {mtype}")
    algorithm: hashes.HashAlgorithm = hashes.SHA256() if mtype == SHA2_256 else hashes.SHA512()
    digest = hashes.Hash(algorithm)
    digest.update(data)
    return digest.finalize()


def record_matches(record: TlsaRecord, cert: x509.Certificate) -> bool:
    """Whether a usable record matches `cert` (selector and matching type as the record says)."""
    if not record.usable:
        return False
    return hmac.compare_digest(association(selected_bytes(cert, record.selector), record.mtype), record.data)


def _names_ok(leaf: x509.Certificate, names: Sequence[str]) -> bool:
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        presented = san.get_values_for_type(x509.DNSName)  # ID-6: never the subject CN
    except x509.ExtensionNotFound:
        presented = []
    return any(dns_id_matches(ref, p) for ref in names if ref for p in presented)


def _validity_error(certs: Sequence[x509.Certificate], now: datetime.datetime) -> str | None:
    for cert in certs:
        if now > cert.not_valid_after_utc:
            return f"certificate {cert.subject.rfc4514_string()} has expired"
        if now < cert.not_valid_before_utc:
            return f"certificate {cert.subject.rfc4514_string()} is not yet valid"
    return None


def _chains_to(leaf: x509.Certificate, intermediates: Sequence[x509.Certificate], anchor: x509.Certificate,
               now: datetime.datetime) -> str | None:
    """None when `leaf` chains to `anchor` (the only trust anchor) through `intermediates`, else why not."""
    # As net.tls does for PKIX: OpenSSL's default profile (chain, signatures, CA basic constraints),
    # not the CA/B Forum web rules, which DANE-TA(2) anchors (private CAs) need not follow.
    ca_policy = ExtensionPolicy.permit_all().require_present(x509.BasicConstraints, Criticality.AGNOSTIC, None)
    builder = (PolicyBuilder().store(Store([anchor])).time(now)
               .extension_policies(ca_policy=ca_policy, ee_policy=ExtensionPolicy.permit_all()))
    try:
        builder.build_client_verifier().verify(leaf, list(intermediates))
    except VerificationError as exc:
        return f"the chain does not lead to the TLSA trust anchor ({exc})"
    return None


def verify_chain(records: Sequence[TlsaRecord], der_chain: Sequence[bytes], names: Sequence[str],
                 now: datetime.datetime) -> DaneCheck:
    """Match the presented chain (leaf first, DER) against the TLSA RRset (see the module rule)."""
    usable = [r for r in records if r.usable]
    if not usable:
        return DaneCheck(False, "tlsa-invalid", "no usable TLSA record")
    if not der_chain:
        return DaneCheck(False, "tlsa-invalid", "no certificate presented")
    try:
        chain = [x509.load_der_x509_certificate(d) for d in der_chain]
    except ValueError as exc:
        return DaneCheck(False, "validation-failure", f"unparsable certificate ({exc})")
    leaf = chain[0]
    for record in usable:
        if record.usage == DANE_EE and record_matches(record, leaf):
            return DaneCheck(True, matched=record)  # DANE-5: names and dates ignored
    failure: DaneCheck | None = None
    for record in usable:
        if record.usage != DANE_TA:
            continue
        for depth, cert in enumerate(chain):
            if not record_matches(record, cert):
                continue
            problem = _validity_error(chain[:depth + 1], now)
            if problem is not None:
                failure = failure or DaneCheck(False, "certificate-expired", problem, record)
                continue
            if depth > 0:
                problem = _chains_to(leaf, chain[1:depth], cert, now)
                if problem is not None:
                    failure = failure or DaneCheck(False, "validation-failure", problem, record)
                    continue
            if not _names_ok(leaf, names):
                failure = failure or DaneCheck(
                    False, "certificate-host-mismatch",
                    f"certificate is not valid for {' or '.join(n for n in names if n)} (DANE-TA)", record)
                continue
            return DaneCheck(True, matched=record)
    if failure is not None:
        return failure
    return DaneCheck(False, "tlsa-invalid", "no TLSA record matches the presented certificate chain")
