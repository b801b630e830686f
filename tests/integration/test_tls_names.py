"""Certificate name and chain rules of the after-the-fact check (RFC 6125 via RFC 8461 §4.2)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mta.net.tls import dns_id_matches, reference_name, verify_chain
from mta.sts.decide import cert_result_type
from tests.support.pki import TestPki

MX = "mx1.example.com"


@pytest.fixture
def pki(tmp_path: Path) -> TestPki:
    return TestPki(tmp_path / "pki")


@pytest.mark.parametrize(("reference", "presented", "ok"), [
    ("mx1.example.com", "MX1.Example.COM", True),  # ID-1
    ("mx1.example.com.", "mx1.example.com", True),  # DNS trailing dot
    ("mx1.example.com", "*.example.com", True),  # ID-3
    ("example.com", "*.example.com", False),  # ID-3: not the parent
    ("a.mx1.example.com", "*.example.com", False),  # ID-3: exactly one label
    ("mx1.example.com", "mx*.example.com", False),  # ID-4: no partial-label wildcard
    ("xn--bcher-kva.example.com", "xn--*.example.com", False),  # ID-5
    ("mx1.example.com", "mx1.*.com", False),  # wildcard only left-most
    ("example.com", "*.com", False),  # ID-9
    ("com", "*", False),  # ID-9
    ("mx1.example.com", "mx2.example.com", False),
])
def test_id_dns_id_matching(reference: str, presented: str, ok: bool) -> None:
    assert dns_id_matches(reference, presented) is ok


def test_id_2_u_label_reference_is_compared_as_a_label() -> None:
    assert reference_name("B\u00fccher.Example.") == "xn--bcher-kva.example"
    assert dns_id_matches(reference_name("b\u00fccher.example") or "", "xn--bcher-kva.example")


def test_id_8_addresses_are_never_dns_ids(pki: TestPki) -> None:
    assert reference_name("[127.0.0.1]") is None and reference_name("::1") is None
    leaf = pki.leaf("127.0.0.1")  # an IP-address SAN only
    ok, error = verify_chain(_der_chain(leaf.cert_path), str(pki.ca_file), "127.0.0.1")
    assert not ok and cert_result_type(error) == "certificate-host-mismatch"


def test_verify_chain_uses_presented_intermediates(pki: TestPki, tmp_path: Path) -> None:
    chain = pki.ca.create_child_ca().issue_cert(MX)
    der = [x509.load_pem_x509_certificate(p.bytes()).public_bytes(serialization.Encoding.DER)
           for p in chain.cert_chain_pems]
    assert len(der) == 2
    assert verify_chain(der, str(pki.ca_file), MX) == (True, None)
    ok, error = verify_chain(der[:1], str(pki.ca_file), MX)  # without the intermediate: no path to the root
    assert not ok and cert_result_type(error) == "certificate-not-trusted"
    ok, error = verify_chain(der, None, MX)  # the certifi bundle does not know the test CA
    assert not ok and cert_result_type(error) == "certificate-not-trusted"


def test_verify_chain_self_signed(pki: TestPki) -> None:
    other = TestPki(pki.folder / "other")
    ok, error = verify_chain(_der_chain(other.ca_file), str(pki.ca_file), MX)
    assert not ok and error is not None and "self-signed" in error
    assert cert_result_type(error) == "certificate-not-trusted"


def _der_chain(pem_path: Path) -> list[bytes]:
    return [c.public_bytes(serialization.Encoding.DER) for c in x509.load_pem_x509_certificates(pem_path.read_bytes())]
