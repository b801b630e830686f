"""DANE per-host decisions (DANE-1..4) and TLSA record usability: pure, table-driven."""

from __future__ import annotations

import pytest

from mta.dane import decide
from mta.dane.decide import AUTHENTICATE, BOGUS, NOT_APPLICABLE, UNUSABLE
from mta.dane.records import TlsaAnswer, TlsaRecord

H32, H64 = b"\x01" * 32, b"\x02" * 64


@pytest.mark.parametrize(("record", "usable"), [
    (TlsaRecord(3, 1, 1, H32), True),
    (TlsaRecord(3, 0, 1, H32), True),
    (TlsaRecord(3, 1, 2, H64), True),
    (TlsaRecord(3, 1, 0, b"spki"), True),
    (TlsaRecord(2, 0, 1, H32), True),
    (TlsaRecord(2, 1, 2, H64), True),
    (TlsaRecord(0, 0, 1, H32), False),  # PKIX-TA
    (TlsaRecord(1, 1, 1, H32), False),  # PKIX-EE
    (TlsaRecord(4, 1, 1, H32), False),  # unknown usage
    (TlsaRecord(255, 1, 1, H32), False),
    (TlsaRecord(3, 2, 1, H32), False),  # unknown selector
    (TlsaRecord(3, 1, 3, H32), False),  # unknown matching type
    (TlsaRecord(3, 1, 1, H64), False),  # digest of the wrong length
    (TlsaRecord(3, 1, 2, H32), False),
    (TlsaRecord(3, 1, 1, b""), False),
    (TlsaRecord(3, 1, 0, b""), False),
])
def test_dane_4_record_usability(record: TlsaRecord, usable: bool) -> None:
    assert record.usable is usable


def test_tlsa_presentation_text() -> None:
    assert TlsaRecord(3, 1, 1, bytes.fromhex("ab01")).text() == "3 1 1 AB01"


@pytest.mark.parametrize(("enabled", "mx_secure", "addr_secure", "lookup"), [
    (False, True, True, False),
    (True, False, True, False),   # DANE-1: insecure MX RRset -> no TLSA query at all
    (True, True, False, False),   # insecure address records of the host -> no TLSA query
    (True, False, False, False),
    (True, True, True, True),
])
def test_dane_1_precheck(enabled: bool, mx_secure: bool, addr_secure: bool, lookup: bool) -> None:
    verdict = decide.precheck(enabled=enabled, mx_secure=mx_secure, addresses_secure=addr_secure)
    assert (verdict is None) is lookup
    if verdict is not None:
        assert verdict.kind == NOT_APPLICABLE and not verdict.applies


@pytest.mark.parametrize(("host", "canonical", "bases", "names"), [
    ("mx.a.test", "", ["mx.a.test"], ("mx.a.test",)),
    ("mx.a.test", "mx.a.test", ["mx.a.test"], ("mx.a.test",)),
    ("mx.a.test", "mail.hoster.test", ["mail.hoster.test", "mx.a.test"], ("mx.a.test", "mail.hoster.test")),
])
def test_dane_2_secure_cname_bases_and_names(host: str, canonical: str, bases: list[str],
                                             names: tuple[str, ...]) -> None:
    assert decide.tlsa_bases(host, canonical) == bases
    assert decide.reference_names(host, canonical) == names
    assert decide.tlsa_owner(bases[0], 25) == f"_25._tcp.{bases[0]}"


GOOD, PKIX_ONLY = TlsaRecord(3, 1, 1, H32), TlsaRecord(1, 1, 1, H32)


@pytest.mark.parametrize(("records", "secure", "kind"), [
    ((), True, None),                       # no TLSA here: try the next base / no DANE
    ((), False, None),
    ((GOOD,), False, None),                 # an insecure RRset is never used (DANE-1)
    ((GOOD,), True, AUTHENTICATE),          # DANE-2
    ((GOOD, PKIX_ONLY), True, AUTHENTICATE),
    ((PKIX_ONLY,), True, UNUSABLE),         # DANE-4
    ((TlsaRecord(9, 9, 9, b"x"),), True, UNUSABLE),
])
def test_dane_2_4_from_answer(records: tuple[TlsaRecord, ...], secure: bool, kind: str | None) -> None:
    verdict = decide.from_answer("mx.a.test", ("mx.a.test",), TlsaAnswer("_25._tcp.mx.a.test", records, secure))
    assert (verdict.kind if verdict else None) == kind
    if verdict is not None:
        assert verdict.base == "mx.a.test" and verdict.policy_strings == tuple(r.text() for r in records)


def test_dane_3_failed_lookup_is_bogus_not_no_tlsa() -> None:
    verdict = decide.from_failure("mx.a.test", ("mx.a.test",), "SERVFAIL")
    assert verdict.kind == BOGUS and verdict.applies and "SERVFAIL" in verdict.reason
    assert decide.none_found().kind == NOT_APPLICABLE
