"""DANE certificate matching (DANE-4, DANE-5): table-driven over usages, selectors and matching types."""

from __future__ import annotations

import datetime
import hashlib

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID

from mta.dane.records import TlsaRecord
from mta.dane.verify import association, record_matches, verify_chain

NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)


def _der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)


def _chain(leaf: trustme.LeafCert) -> list[bytes]:
    return [_der(p.bytes()) for p in leaf.cert_chain_pems]


def self_signed(name: str, *, expired: bool = False) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    start, end = (NOW - 30 * DAY, NOW - DAY) if expired else (NOW - DAY, NOW + 30 * DAY)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(Encoding.DER)


def record_for(der: bytes, usage: int, selector: int, mtype: int) -> TlsaRecord:
    cert = x509.load_der_x509_certificate(der)
    data = der if selector == 0 else cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return TlsaRecord(usage, selector, mtype, association(data, mtype))


@pytest.fixture(scope="module")
def pki() -> dict[str, object]:
    root = trustme.CA()
    inter = root.create_child_ca()
    leaf = inter.issue_cert("mx1.dane.test")
    target_leaf = inter.issue_cert("mail.hoster.test")
    now = datetime.datetime.now(datetime.UTC)
    expired = inter.issue_cert("mx1.dane.test", not_before=now - 30 * DAY, not_after=now - DAY)
    return {"root": _der(root.cert_pem.bytes()), "inter": _der(inter.cert_pem.bytes()), "leaf": _chain(leaf),
            "target_leaf": _chain(target_leaf), "expired": _chain(expired)}


@pytest.mark.parametrize("selector", [0, 1])
@pytest.mark.parametrize("mtype", [0, 1, 2])
def test_dane_5_ee_matches_leaf_for_every_selector_and_matching_type(selector: int, mtype: int) -> None:
    leaf = self_signed("anything.example")
    rec = record_for(leaf, 3, selector, mtype)
    check = verify_chain([rec], [leaf], ["mx1.dane.test"], NOW)
    assert check.ok and check.matched == rec


def test_dane_5_ee_ignores_names_and_expiry() -> None:
    leaf = self_signed("other.example", expired=True)
    assert verify_chain([record_for(leaf, 3, 1, 1)], [leaf], ["mx1.dane.test"], NOW).ok


@pytest.mark.parametrize("mtype", [0, 1, 2])
def test_dane_5_ee_mismatch_is_tlsa_invalid(mtype: int) -> None:
    rec = record_for(self_signed("a.example"), 3, 1, mtype)
    check = verify_chain([rec], [self_signed("a.example")], ["a.example"], NOW)
    assert not check.ok and check.result_type == "tlsa-invalid"


@pytest.mark.parametrize("usage", [0, 1])
def test_dane_5_pkix_usages_are_never_relied_on(usage: int) -> None:
    leaf = self_signed("mx1.dane.test")
    check = verify_chain([record_for(leaf, usage, 0, 1)], [leaf], ["mx1.dane.test"], NOW)
    assert not check.ok and check.result_type == "tlsa-invalid" and check.reason == "no usable TLSA record"


@pytest.mark.parametrize("selector", [0, 1])
@pytest.mark.parametrize("mtype", [0, 1, 2])
def test_dane_5_ta_intermediate_anchor(pki: dict[str, object], selector: int, mtype: int) -> None:
    rec = record_for(pki["inter"], 2, selector, mtype)  # type: ignore[arg-type]
    assert verify_chain([rec], pki["leaf"], ["mx1.dane.test"], NOW).ok  # type: ignore[arg-type]


def test_dane_5_ta_root_anchor_in_presented_chain(pki: dict[str, object]) -> None:
    chain = [*pki["leaf"], pki["root"]]  # type: ignore[misc]
    assert verify_chain([record_for(pki["root"], 2, 0, 1)], chain, ["mx1.dane.test"], NOW).ok  # type: ignore[arg-type]


def test_dane_5_ta_anchor_not_presented_is_tlsa_invalid(pki: dict[str, object]) -> None:
    # The server leaves the root out: a 2 x 1 record of it cannot be matched (RFC 7671 §5.2.2).
    check = verify_chain([record_for(pki["root"], 2, 0, 1)], pki["leaf"], ["mx1.dane.test"], NOW)  # type: ignore[arg-type]
    assert not check.ok and check.result_type == "tlsa-invalid"


def test_dane_5_ta_checks_the_name(pki: dict[str, object]) -> None:
    rec = record_for(pki["inter"], 2, 1, 1)  # type: ignore[arg-type]
    check = verify_chain([rec], pki["leaf"], ["mx2.dane.test"], NOW)  # type: ignore[arg-type]
    assert not check.ok and check.result_type == "certificate-host-mismatch"


def test_dane_5_ta_accepts_the_secure_cname_target_name(pki: dict[str, object]) -> None:
    rec = record_for(pki["inter"], 2, 1, 1)  # type: ignore[arg-type]
    assert verify_chain([rec], pki["target_leaf"], ["mx.dane.test", "mail.hoster.test"], NOW).ok  # type: ignore[arg-type]
    assert not verify_chain([rec], pki["target_leaf"], ["mx.dane.test"], NOW).ok  # type: ignore[arg-type]


def test_dane_5_ta_expired_leaf(pki: dict[str, object]) -> None:
    rec = record_for(pki["inter"], 2, 0, 1)  # type: ignore[arg-type]
    check = verify_chain([rec], pki["expired"], ["mx1.dane.test"], NOW)  # type: ignore[arg-type]
    assert not check.ok and check.result_type == "certificate-expired"


def test_dane_5_ta_leaf_with_a_foreign_issuer_does_not_chain(pki: dict[str, object]) -> None:
    other = trustme.CA().issue_cert("mx1.dane.test")
    chain = [_chain(other)[0], pki["inter"]]  # type: ignore[list-item]
    check = verify_chain([record_for(pki["inter"], 2, 0, 1)], chain, ["mx1.dane.test"], NOW)  # type: ignore[arg-type]
    assert not check.ok and check.result_type == "validation-failure"


def test_dane_5_ta_matching_the_leaf_checks_only_the_name() -> None:
    leaf = self_signed("mx1.dane.test")
    assert verify_chain([record_for(leaf, 2, 1, 1)], [leaf], ["mx1.dane.test"], NOW).ok
    assert not verify_chain([record_for(leaf, 2, 1, 1)], [leaf], ["mx9.dane.test"], NOW).ok


def test_dane_5_one_matching_record_among_others_is_enough(pki: dict[str, object]) -> None:
    leaf = self_signed("x.example")
    records = [TlsaRecord(3, 1, 1, b"\0" * 32), TlsaRecord(1, 1, 1, hashlib.sha256(b"x").digest()),
               record_for(leaf, 3, 0, 2)]
    assert verify_chain(records, [leaf], ["x.example"], NOW).ok


def test_dane_5_garbage_and_empty_chains() -> None:
    rec = TlsaRecord(3, 1, 1, b"\1" * 32)
    assert verify_chain([rec], [], ["a"], NOW).result_type == "tlsa-invalid"
    assert verify_chain([rec], [b"not a certificate"], ["a"], NOW).result_type == "validation-failure"
    assert not record_matches(TlsaRecord(3, 1, 7, b"\1" * 32), x509.load_der_x509_certificate(self_signed("a")))
