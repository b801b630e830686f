"""TLSRPT record selection and parsing, table-driven (RPT-1..7)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from mta.tlsrpt.record import (
    TlsRptRecord,
    TlsRptRecordError,
    mailto_addresses,
    parse_tlsrpt_record,
    select_tlsrpt_record,
)

ACCEPTED: list[tuple[str, Sequence[str | Sequence[str]], tuple[str, ...]]] = [
    ("RPT-1 mailto", ["v=TLSRPTv1; rua=mailto:tls@example.com"], ("mailto:tls@example.com",)),
    ("RPT-2 https", ["v=TLSRPTv1; rua=https://r.example.com/v1/tlsrpt"], ("https://r.example.com/v1/tlsrpt",)),
    ("RPT-3 both", ["v=TLSRPTv1; rua=mailto:a@x.example,https://r.example/t"],
     ("mailto:a@x.example", "https://r.example/t")),
    ("RPT-3 spaces around comma", ["v=TLSRPTv1;rua=mailto:a@x.example ,\thttps://r.example/t"],
     ("mailto:a@x.example", "https://r.example/t")),
    ("RPT-4 other TXT records ignored", ["v=spf1 -all", "v=TLSRPTv1; rua=mailto:a@x.example", "hello"],
     ("mailto:a@x.example",)),
    ("RPT-4 v=TLSRPTv10 is not a TLSRPT record", ["v=TLSRPTv10; rua=mailto:z@x.example",
                                                   "v=TLSRPTv1; rua=mailto:a@x.example"], ("mailto:a@x.example",)),
    ("RPT-5 multi-string joined without spaces", [["v=TLSRPTv1; rua=mail", "to:a@x.exa", "mple"]],
     ("mailto:a@x.example",)),
    ("RPT-6 unknown extension ignored", ["v=TLSRPTv1; ext_1=foo; rua=mailto:a@x.example; x.y-z=1"],
     ("mailto:a@x.example",)),
    ("RPT-6 trailing delimiter", ["v=TLSRPTv1; rua=mailto:a@x.example;"], ("mailto:a@x.example",)),
    ("RPT-6 space before delimiter", ["v=TLSRPTv1 ; rua=mailto:a@x.example ;"], ("mailto:a@x.example",)),
    ("RPT-6 first rua wins", ["v=TLSRPTv1; rua=mailto:a@x.example; rua=mailto:b@x.example"],
     ("mailto:a@x.example",)),
    ("RPT-7 http and ftp skipped", ["v=TLSRPTv1; rua=http://r.example/t,ftp://r.example/t,mailto:a@x.example"],
     ("mailto:a@x.example",)),
    ("RPT-7 scheme case-insensitive", ["v=TLSRPTv1; rua=MAILTO:a@x.example,HTTPS://r.example/t"],
     ("MAILTO:a@x.example", "HTTPS://r.example/t")),
    ("RPT-3 encoded comma stays in the URI", ["v=TLSRPTv1; rua=https://r.example/a%2Cb%3Bc%21d"],
     ("https://r.example/a%2Cb%3Bc%21d",)),
]


@pytest.mark.parametrize(("texts", "rua"), [c[1:] for c in ACCEPTED], ids=[c[0] for c in ACCEPTED])
def test_rpt_1_7_accepted_records(texts: Sequence[str | Sequence[str]], rua: tuple[str, ...]) -> None:
    assert select_tlsrpt_record(texts) == TlsRptRecord(rua)


REJECTED: list[tuple[str, Sequence[str | Sequence[str]]]] = [
    ("no records at all", []),
    ("no TLSRPT record", ["v=spf1 -all", "v=STSv1; id=1"]),
    ("RPT-4 two TLSRPT records", ["v=TLSRPTv1; rua=mailto:a@x.example", "v=TLSRPTv1; rua=mailto:b@x.example"]),
    ("RPT-4 two records, one broken", ["v=TLSRPTv1; rua=mailto:a@x.example", "v=TLSRPTv1;"]),
    ("RPT-6 missing rua", ["v=TLSRPTv1; ext=1"]),
    ("RPT-6 version only", ["v=TLSRPTv1"]),
    ("RPT-6 rua is case-sensitive", ["v=TLSRPTv1; RUA=mailto:a@x.example"]),
    ("RPT-6 v= is case-sensitive", ["V=TLSRPTv1; rua=mailto:a@x.example"]),
    ("version must come first", ["rua=mailto:a@x.example; v=TLSRPTv1"]),
    ("leading space before version", [" v=TLSRPTv1; rua=mailto:a@x.example"]),
    ("RPT-7 only http", ["v=TLSRPTv1; rua=http://r.example/t"]),
    ("RPT-7 only ftp and data", ["v=TLSRPTv1; rua=ftp://r.example/t,data:text/plain,hi"]),
    ("empty rua", ["v=TLSRPTv1; rua="]),
    ("mailto without address", ["v=TLSRPTv1; rua=mailto:"]),
    ("mailto without domain", ["v=TLSRPTv1; rua=mailto:nobody"]),
    ("https without host", ["v=TLSRPTv1; rua=https:///path"]),
    ("https with bad port", ["v=TLSRPTv1; rua=https://r.example:99999/t"]),
    ("space-separated URIs", ["v=TLSRPTv1; rua=mailto:a@x.example https://r.example/t"]),
    ("malformed field", ["v=TLSRPTv1; rua=mailto:a@x.example; junk"]),
]


@pytest.mark.parametrize("texts", [c[1] for c in REJECTED], ids=[c[0] for c in REJECTED])
def test_rpt_4_6_7_unusable_record_sets(texts: Sequence[str | Sequence[str]]) -> None:
    with pytest.raises(TlsRptRecordError):
        select_tlsrpt_record(texts)


def test_rpt_error_is_a_value_error() -> None:
    assert issubclass(TlsRptRecordError, ValueError)


def test_rpt_1_3_mailto_and_https_accessors() -> None:
    record = select_tlsrpt_record(["v=TLSRPTv1; rua=mailto:tls@example.com?subject=x,https://r.example/t,"
                                   "mailto:a%2Cb@x.example"])
    assert record.mailto == ("tls@example.com", "a,b@x.example")
    assert record.https == ("https://r.example/t",)


def test_rpt_3_mailto_with_two_addresses() -> None:
    assert mailto_addresses("mailto:a@x.example,b@y.example") == ("a@x.example", "b@y.example")


def test_rpt_mailto_addresses_percent_decoding() -> None:
    assert mailto_addresses("mailto:%C3%BC%21x@x.example") == ("ü!x@x.example",)
    with pytest.raises(TlsRptRecordError):
        mailto_addresses("mailto:%FF@x.example")  # not UTF-8
    with pytest.raises(TlsRptRecordError):
        mailto_addresses("https://r.example/")


def test_rpt_7_invalid_utf8_mailto_is_skipped_not_fatal() -> None:
    record = parse_tlsrpt_record("v=TLSRPTv1; rua=mailto:%FF@x.example,https://r.example/t")
    assert record.rua == ("https://r.example/t",)
