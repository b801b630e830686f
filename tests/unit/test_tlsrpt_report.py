"""TLS report JSON, gzip, file name and email (RPT-9, RPT-11, RPT-14..18, RPT-22)."""

from __future__ import annotations

import email
import email.policy
import gzip
import json
import re
from datetime import UTC, date, datetime
from email.message import EmailMessage

import pytest

from mta.tlsrpt.report import (
    RESULT_TYPES,
    FailureDetail,
    PolicySummary,
    build_report,
    build_report_email,
    gzip_report,
    report_filename,
    report_json,
    submitter_domain,
)

DAY = date(2024, 5, 1)
STS_LINES = ("version: STSv1", "mode: enforce", "mx: mail.example.com", "mx: *.backup.example.com", "max_age: 604800")
EXPIRED = FailureDetail(
    result_type="certificate-expired",
    sending_mta_ip="192.0.2.10",
    receiving_mx_hostname="mail.example.com.",
    receiving_ip="2001:DB8:0:0:0:0:0:25",
    failed_session_count=3,
    failure_reason_code="X509_V_ERR_CERT_HAS_EXPIRED",
    receiving_mx_helo="mail.example.com",
)
FETCH = FailureDetail("sts-policy-fetch-error", None, None, None, 1, additional_information="https://x.example/why")
STS = PolicySummary("sts", STS_LINES, "example.com", ("mail.example.com", "*.backup.example.com"), 40, 3, (EXPIRED,))
NONE = PolicySummary("no-policy-found", (), "plain.example", (), 7, 0, ())


def report(policies: tuple[PolicySummary, ...] = (STS,)) -> dict[str, object]:
    return build_report(organization_name="Relay Org", contact_info="tlsrpt@sender.example",
                        report_id="2024-05-01T00:00:00Z_example.com@sender.example", day=DAY, policies=policies)


def loaded(policies: tuple[PolicySummary, ...] = (STS,)) -> dict[str, object]:
    """The report as a receiver sees it: parsed from the bytes we emit."""
    data = json.loads(report_json(report(policies)).decode("utf-8"))
    assert isinstance(data, dict)
    return data


def test_rpt_9_top_level_members_and_types() -> None:
    data = loaded()
    assert list(data) == ["organization-name", "date-range", "contact-info", "report-id", "policies"]
    assert data["organization-name"] == "Relay Org"
    assert data["contact-info"] == "tlsrpt@sender.example"
    assert data["report-id"] == "2024-05-01T00:00:00Z_example.com@sender.example"
    assert isinstance(data["policies"], list) and len(data["policies"]) == 1  # an array even with one element


def test_rpt_11_date_range_is_one_utc_day() -> None:
    assert loaded()["date-range"] == {"start-datetime": "2024-05-01T00:00:00Z", "end-datetime": "2024-05-01T23:59:59Z"}
    dr = build_report(organization_name="o", contact_info="a@b.example", report_id="r", day=datetime(2024, 2, 29, 13),
                      policies=[STS])["date-range"]
    assert dr == {"start-datetime": "2024-02-29T00:00:00Z", "end-datetime": "2024-02-29T23:59:59Z"}


def test_rpt_9_14_sts_policy_object() -> None:
    entry = loaded()["policies"][0]  # type: ignore[index]
    assert list(entry) == ["policy", "summary", "failure-details"]
    policy = entry["policy"]
    assert policy == {
        "policy-type": "sts",
        "policy-string": list(STS_LINES),  # one string per line, each mx its own element
        "policy-domain": "example.com",
        "mx-host": ["mail.example.com", "*.backup.example.com"],  # RPT-9 decision: array
    }
    assert all(isinstance(s, str) for s in policy["policy-string"])
    assert entry["summary"] == {"total-successful-session-count": 40, "total-failure-session-count": 3}
    assert all(type(v) is int for v in entry["summary"].values())


def test_rpt_9_failure_details_members_and_types() -> None:
    detail = loaded()["policies"][0]["failure-details"][0]  # type: ignore[index]
    assert detail == {
        "result-type": "certificate-expired",
        "sending-mta-ip": "192.0.2.10",
        "receiving-mx-hostname": "mail.example.com",
        "receiving-mx-helo": "mail.example.com",
        "receiving-ip": "2001:db8::25",  # RFC 5952 canonical text
        "failed-session-count": 3,
        "failure-reason-code": "X509_V_ERR_CERT_HAS_EXPIRED",
    }
    assert type(detail["failed-session-count"]) is int


def test_rpt_9_optional_members_left_out_when_unknown() -> None:
    detail = loaded((PolicySummary("sts", STS_LINES, "example.com", ("mail.example.com",), 0, 1, (FETCH,)),))
    fetch = detail["policies"][0]["failure-details"][0]  # type: ignore[index]
    assert fetch == {"result-type": "sts-policy-fetch-error", "failed-session-count": 1,
                     "additional-information": "https://x.example/why"}


def test_rpt_9_no_policy_found_has_no_policy_string_or_mx_host() -> None:
    entry = loaded((STS, NONE))["policies"][1]  # type: ignore[index]
    assert entry["policy"] == {"policy-type": "no-policy-found", "policy-domain": "plain.example"}
    assert entry["failure-details"] == []  # still an array


def test_rpt_9_domains_in_a_label_form() -> None:
    idn = PolicySummary("sts", ("version: STSv1", "mode: testing", "mx: *.bücher.example", "max_age: 86400"),
                        "Bücher.Example.", ("*.bücher.example",), 1, 0, ())
    policy = loaded((idn,))["policies"][0]["policy"]  # type: ignore[index]
    assert policy["policy-domain"] == "xn--bcher-kva.example"
    assert policy["mx-host"] == ["*.xn--bcher-kva.example"]


def test_rpt_15_result_types_are_the_registry() -> None:
    assert {
        "starttls-not-supported", "certificate-host-mismatch", "certificate-expired", "certificate-not-trusted",
        "validation-failure", "tlsa-invalid", "dnssec-invalid", "dane-required", "sts-policy-fetch-error",
        "sts-policy-invalid", "sts-webpki-invalid",
    } == RESULT_TYPES
    for result_type in RESULT_TYPES:
        detail = FailureDetail(result_type, "192.0.2.1", "mx.example.com", "192.0.2.2", 1)
        built = report((PolicySummary("sts", STS_LINES, "example.com", ("mx.example.com",), 0, 1, (detail,)),))
        assert built["policies"][0]["failure-details"][0]["result-type"] == result_type  # type: ignore[index]


@pytest.mark.parametrize("bad", ["certificate_expired", "Certificate-Expired", "tls-failure", ""])
def test_rpt_15_unregistered_result_type_rejected(bad: str) -> None:
    detail = FailureDetail(bad, "192.0.2.1", "mx.example.com", "192.0.2.2", 1)
    with pytest.raises(ValueError):
        report((PolicySummary("sts", STS_LINES, "example.com", ("mx.example.com",), 0, 1, (detail,)),))


@pytest.mark.parametrize(
    "policy",
    [
        PolicySummary("dane", (), "example.com", (), 0, 0, ()),  # unknown policy-type
        PolicySummary("sts", STS_LINES, "example.com", (), -1, 0, ()),  # negative count
        PolicySummary("sts", STS_LINES, "example.com", (), True, 0, ()),  # bool is not a JSON integer
        PolicySummary("sts", STS_LINES, "example.com", (), 2**53, 0, ()),  # beyond I-JSON integers
        PolicySummary("sts", STS_LINES, "bad domain", (), 0, 0, ()),
        PolicySummary("sts", ("mode: \ud800",), "example.com", (), 0, 0, ()),  # lone surrogate (I-JSON)
        PolicySummary("sts", STS_LINES, "example.com", (), 0, 1,
                      (FailureDetail("validation-failure", "not-an-ip", None, None, 1),)),
    ],
)
def test_rpt_9_invalid_values_rejected(policy: PolicySummary) -> None:
    with pytest.raises(ValueError):
        report((policy,))


def test_rpt_9_empty_policies_rejected() -> None:
    with pytest.raises(ValueError):
        report(())


def test_rpt_9_i_json_utf8_unique_members() -> None:
    raw = report_json(build_report(organization_name="Société Générale", contact_info="t@sender.example",
                                   report_id="r1", day=DAY, policies=[STS]))
    assert "Société".encode() in raw  # UTF-8, not escapes
    pairs: list[list[tuple[str, object]]] = []

    def keep(members: list[tuple[str, object]]) -> dict[str, object]:
        pairs.append(members)
        return dict(members)

    json.loads(raw, object_pairs_hook=keep)
    for members in pairs:
        names = [name for name, _ in members]
        assert len(names) == len(set(names))
    with pytest.raises(ValueError):
        report_json({"x": float("nan")})


def test_rpt_17_gzip_round_trip_and_deterministic() -> None:
    raw = report_json(report())
    packed = gzip_report(raw)
    assert packed[:2] == b"\x1f\x8b"
    assert packed[4:8] == b"\0\0\0\0"  # mtime 0
    assert gzip.decompress(packed) == raw
    assert gzip_report(raw) == packed


def test_rpt_16_filename_pattern() -> None:
    name = report_filename("mail.sender.example", "example.com", DAY, "001")
    assert name == "mail.sender.example!example.com!1714521600!1714607999!001.json.gz"
    assert re.fullmatch(r"[a-z0-9.-]+![a-z0-9.-]+!\d+!\d+(![A-Za-z0-9]+)?\.json\.gz", name)
    begin, end = (int(x) for x in name.split("!")[2:4])
    start = datetime.fromtimestamp(begin, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    stop = datetime.fromtimestamp(end, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert {"start-datetime": start, "end-datetime": stop} == loaded()["date-range"]  # RPT-22: agree


def test_rpt_16_filename_unique_id_optional_alnum_domains_a_label() -> None:
    assert report_filename("Sender.Example", "bücher.example", DAY, "") == (
        "sender.example!xn--bcher-kva.example!1714521600!1714607999.json.gz")
    for bad in ("a-1", "a!b", "a.b", "ü"):
        with pytest.raises(ValueError):
            report_filename("sender.example", "example.com", DAY, bad)


def test_rpt_18_submitter_domain() -> None:
    assert submitter_domain("tlsrpt@Mail.Sender.Example") == "mail.sender.example"
    assert submitter_domain("mailto:tlsrpt@sender.example") == "sender.example"
    assert submitter_domain("tlsrpt@bücher.example") == "xn--bcher-kva.example"
    for bad in ("no-at-sign", "@sender.example", "a@", "a@bad domain"):
        with pytest.raises(ValueError):
            submitter_domain(bad)


def email_args(**overrides: object) -> dict[str, object]:
    raw = report_json(report())
    args: dict[str, object] = {
        "report_gz": gzip_report(raw),
        "filename": report_filename("sender.example", "example.com", DAY, "1"),
        "policy_domain": "example.com",
        "submitter": submitter_domain("tlsrpt@sender.example"),
        "report_id": "2024-05-01T00:00:00Z_example.com@sender.example",
        "from_addr": "TLS Reports <tlsrpt@sender.example>",
        "to_addr": "tls@example.com",
        "now": datetime(2024, 5, 2, 2, 17, tzinfo=UTC),
        "message_id": "<rpt-1@sender.example>",
    }
    args.update(overrides)
    return args


def parsed_email(**overrides: object) -> EmailMessage:
    raw = build_report_email(**email_args(**overrides))  # type: ignore[arg-type]
    assert raw.isascii()
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    assert b"\n" not in raw.replace(b"\r\n", b"")
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    assert not msg.defects
    return msg


def test_rpt_18_report_email_headers() -> None:
    msg = parsed_email()
    assert msg["TLS-Report-Domain"] == "example.com"
    assert msg["TLS-Report-Submitter"] == "sender.example"
    assert msg["Subject"] == ("Report Domain: example.com Submitter: sender.example "
                              "Report-ID: <2024-05-01T00:00:00Z_example.com@sender.example>")
    assert msg["MIME-Version"] == "1.0"
    assert msg["From"].addresses[0].addr_spec == "tlsrpt@sender.example"
    assert msg["To"].addresses[0].addr_spec == "tls@example.com"
    assert msg["Date"].datetime == datetime(2024, 5, 2, 2, 17, tzinfo=UTC)
    assert msg["Message-ID"] == "<rpt-1@sender.example>"


def test_rpt_18_report_email_structure_and_attachment() -> None:
    msg = parsed_email()
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "tlsrpt"
    first, second = msg.iter_parts()
    assert first.get_content_type() == "text/plain"
    assert "example.com" in first.get_content()
    assert second.get_content_type() == "application/tlsrpt+gzip"
    assert second["Content-Transfer-Encoding"] == "base64"
    assert second.get_content_disposition() == "attachment"
    assert second.get_filename() == "sender.example!example.com!1714521600!1714607999!1.json.gz"
    body = second.get_content()
    assert isinstance(body, bytes)
    assert json.loads(gzip.decompress(body)) == loaded()


def test_rpt_18_22_filename_must_match_headers() -> None:
    with pytest.raises(ValueError):
        parsed_email(filename=report_filename("other.example", "example.com", DAY, "1"))
    with pytest.raises(ValueError):
        parsed_email(filename=report_filename("sender.example", "other.example", DAY, "1"))


def test_rpt_17_18_attachment_must_be_gzip() -> None:
    with pytest.raises(ValueError):
        parsed_email(report_gz=report_json(report()))


def test_rpt_18_header_injection_rejected() -> None:
    with pytest.raises(ValueError):
        parsed_email(to_addr="tls@example.com\r\nBcc: x@evil.example")


def test_rpt_18_report_id_already_bracketed_kept() -> None:
    assert parsed_email(report_id="<r1@sender.example>")["Subject"].endswith("Report-ID: <r1@sender.example>")


def test_rpt_18_deterministic() -> None:
    assert build_report_email(**email_args()) == build_report_email(**email_args())  # type: ignore[arg-type]
