"""Build RFC 8460 TLS reports: the JSON object, its gzip file, its file name and its report email.

Rule: the JSON has exactly the members of RFC 8460 §4.4 with the types given there (RPT-9):
``policies`` is always an array, ``policy-string`` and ``mx-host`` are arrays of strings with one
element per line or pattern, never nested (RPT-14, and the RPT-9 decision for ``mx-host``), counts
are JSON integers, ``result-type`` is one of the registered names (RPT-15), domains are A-labels.
A report covers one full UTC day, ``YYYY-MM-DDT00:00:00Z`` to ``YYYY-MM-DDT23:59:59Z`` (RPT-11
decision); the file name (RPT-16) carries the same two instants as Unix times, so name, subject and
JSON agree (RPT-22). Output is I-JSON (RFC 7493): UTF-8, unique member names, integers within
±(2**53 - 1), no lone surrogates. The email (RPT-18) is multipart/report; report-type="tlsrpt" with
the gzip file as an application/tlsrpt+gzip base64 attachment. It is not DKIM-signed here.

Pure: no I/O, no clock (``day`` and ``now`` are arguments); gzip uses mtime 0 and the MIME boundary
is a digest of the content, so equal input gives equal bytes.
"""

from __future__ import annotations

import email.policy
import gzip
import hashlib
import ipaddress
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from email.message import EmailMessage, MIMEPart
from email.utils import format_datetime

from mta import idn

#: The "STARTTLS Validation Result Types" registry of RFC 8460 §6.6 (RPT-15).
RESULT_TYPES: frozenset[str] = frozenset({
    "starttls-not-supported",
    "certificate-host-mismatch",
    "certificate-expired",
    "certificate-not-trusted",
    "validation-failure",
    "tlsa-invalid",
    "dnssec-invalid",
    "dane-required",
    "sts-policy-fetch-error",
    "sts-policy-invalid",
    "sts-webpki-invalid",
})
#: policy-type values of RFC 8460 §4.4.
POLICY_TYPES: frozenset[str] = frozenset({"sts", "tlsa", "no-policy-found"})

_MAX_INT = 2**53 - 1  # I-JSON §2.2: integers exactly representable as IEEE doubles
_UNIQUE_ID = re.compile(r"[A-Za-z0-9]+")  # RPT-16: alphanumeric only
_LABEL = r"(?:[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?)"
_DOMAIN = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*")
_POLICY = email.policy.SMTP.clone(cte_type="7bit")


@dataclass(frozen=True)
class FailureDetail:
    """One failure-details entry (RFC 8460 §4.4); None members are left out of the JSON."""

    result_type: str
    sending_mta_ip: str | None
    receiving_mx_hostname: str | None
    receiving_ip: str | None
    failed_session_count: int
    failure_reason_code: str | None = None
    additional_information: str | None = None
    receiving_mx_helo: str | None = None


@dataclass(frozen=True)
class PolicySummary:
    """One policies[] entry: the applied policy, its counts and its failures (RPT-10)."""

    policy_type: str  # "sts" | "no-policy-found"
    policy_string: tuple[str, ...]  # Policy.lines() for sts
    policy_domain: str
    mx_host: tuple[str, ...]  # patterns (RPT-9 decision: array)
    successful: int
    failed: int
    failures: tuple[FailureDetail, ...]


def _text(value: object, what: str, *, empty: bool = False) -> str:
    """A JSON string member: a str without lone surrogates (I-JSON §2.1)."""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, not {type(value).__name__}")
    if not empty and not value:
        raise ValueError(f"{what} must not be empty")
    if any(0xD800 <= ord(c) <= 0xDFFF for c in value):
        raise ValueError(f"{what} contains a lone surrogate")
    return value


def _count(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_INT:
        raise ValueError(f"{what} must be an integer from 0 to 2**53-1, not {value!r}")
    return value


def _a_label(value: str, what: str, *, wildcard: bool = False) -> str:
    """A domain in A-label form, lower case, without the trailing dot (RPT-9, RPT-16)."""
    name = _text(value, what).strip().rstrip(".").lower()
    prefix = ""
    if wildcard and name.startswith("*."):
        prefix, name = "*.", name[2:]
    if not name.isascii():
        try:
            name = idn.to_ascii(name)  # IDNA 2008, as the DNS queries and the policy match use
        except ValueError as exc:
            raise ValueError(f"{what} is not a domain name: {value!r}") from exc
    if not _DOMAIN.fullmatch(name):
        raise ValueError(f"{what} is not a domain name: {value!r}")
    return prefix + name


def _ip(value: str, what: str) -> str:
    """An IP address in canonical text (RFC 5952 for IPv6)."""
    try:
        return str(ipaddress.ip_address(_text(value, what).strip()))
    except ValueError as exc:
        raise ValueError(f"{what} is not an IP address: {value!r}") from exc


def _failure(detail: FailureDetail) -> dict[str, object]:
    if detail.result_type not in RESULT_TYPES:
        raise ValueError(f"result-type {detail.result_type!r} is not in the RFC 8460 registry (RPT-15)")
    out: dict[str, object] = {"result-type": detail.result_type}
    if detail.sending_mta_ip is not None:
        out["sending-mta-ip"] = _ip(detail.sending_mta_ip, "sending-mta-ip")
    if detail.receiving_mx_hostname is not None:
        out["receiving-mx-hostname"] = _a_label(detail.receiving_mx_hostname, "receiving-mx-hostname")
    if detail.receiving_mx_helo is not None:
        out["receiving-mx-helo"] = _text(detail.receiving_mx_helo, "receiving-mx-helo")
    if detail.receiving_ip is not None:
        out["receiving-ip"] = _ip(detail.receiving_ip, "receiving-ip")
    out["failed-session-count"] = _count(detail.failed_session_count, "failed-session-count")
    if detail.additional_information is not None:
        out["additional-information"] = _text(detail.additional_information, "additional-information")
    if detail.failure_reason_code is not None:
        out["failure-reason-code"] = _text(detail.failure_reason_code, "failure-reason-code")
    return out


def _policy(summary: PolicySummary) -> dict[str, object]:
    if summary.policy_type not in POLICY_TYPES:
        raise ValueError(f"policy-type {summary.policy_type!r} is not one of {sorted(POLICY_TYPES)}")
    policy: dict[str, object] = {"policy-type": summary.policy_type}
    if summary.policy_type != "no-policy-found" or summary.policy_string:
        # One element per policy line, each "mx" line its own element (RPT-14).
        policy["policy-string"] = [_text(line, "policy-string line") for line in summary.policy_string]
    policy["policy-domain"] = _a_label(summary.policy_domain, "policy-domain")
    if summary.policy_type == "sts" or summary.mx_host:
        # RPT-9 decision: always an array of patterns (erratum 6241), never a bare string.
        policy["mx-host"] = [_a_label(p, "mx-host", wildcard=True) for p in summary.mx_host]
    return {
        "policy": policy,
        "summary": {
            "total-successful-session-count": _count(summary.successful, "total-successful-session-count"),
            "total-failure-session-count": _count(summary.failed, "total-failure-session-count"),
        },
        "failure-details": [_failure(d) for d in summary.failures],
    }


def _day(day: date) -> date:
    if isinstance(day, datetime):
        return day.date()
    if not isinstance(day, date):
        raise ValueError("day must be a date")
    return day


def day_bounds(day: date) -> tuple[datetime, datetime]:
    """The first and last second of the UTC day a report covers (RPT-11 decision: ends at 23:59:59Z)."""
    start = datetime.combine(_day(day), time(0), UTC)
    return start, start + timedelta(seconds=86399)


def build_report(
    *, organization_name: str, contact_info: str, report_id: str, day: date, policies: Sequence[PolicySummary]
) -> dict[str, object]:
    """The report object of RFC 8460 §4.4, with exactly its members (RPT-9, RPT-11, RPT-14, RPT-15)."""
    if not policies:
        raise ValueError("a report needs at least one policy")
    start, end = day_bounds(day)
    return {
        "organization-name": _text(organization_name, "organization-name"),
        "date-range": {
            "start-datetime": start.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "end-datetime": end.strftime("%Y-%m-%dT%H:%M:%SZ"),
        },
        "contact-info": _text(contact_info, "contact-info"),
        "report-id": _text(report_id, "report-id"),
        "policies": [_policy(p) for p in policies],
    }


def report_json(report: dict[str, object]) -> bytes:
    """The report as UTF-8 I-JSON (RFC 7493); NaN and infinities are refused."""
    return json.dumps(report, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


def gzip_report(data: bytes) -> bytes:
    """gzip of the report (RPT-17); mtime 0 and no file name, so equal input gives equal bytes."""
    return gzip.compress(data, compresslevel=9, mtime=0)


def report_filename(submitter: str, policy_domain: str, day: date, unique_id: str) -> str:
    """`<submitter>!<policy-domain>!<begin>!<end>[!<unique-id>].json.gz` (RPT-16), times as in the JSON."""
    start, end = day_bounds(day)
    if unique_id and not _UNIQUE_ID.fullmatch(unique_id):
        raise ValueError(f"unique-id must be alphanumeric: {unique_id!r}")
    parts = [_a_label(submitter, "submitter"), _a_label(policy_domain, "policy-domain"),
             str(int(start.timestamp())), str(int(end.timestamp()))]
    if unique_id:
        parts.append(unique_id)
    return "!".join(parts) + ".json.gz"


def submitter_domain(contact_info: str) -> str:
    """The domain of the contact-info address, as TLS-Report-Submitter wants it (RPT-18)."""
    address = _text(contact_info, "contact-info").strip()
    if address.lower().startswith("mailto:"):
        address = address[len("mailto:") :]
    local, at, domain = address.strip("<>").rpartition("@")
    if not at or not local:
        raise ValueError(f"contact-info is not an address: {contact_info!r}")
    return _a_label(domain, "contact-info domain")


def _header_value(value: str, what: str) -> str:
    if not isinstance(value, str) or not value.strip() or any(ord(c) < 0x20 for c in value):
        raise ValueError(f"{what} is not a usable header value: {value!r}")
    return value.strip()


def build_report_email(
    *,
    report_gz: bytes,
    filename: str,
    policy_domain: str,
    submitter: str,
    report_id: str,
    from_addr: str,
    to_addr: str,
    now: datetime,
    message_id: str,
) -> bytes:
    """The report email of RFC 8460 §5.3 (RPT-18), CRLF lines, ready for DKIM signing and sending."""
    if not bytes(report_gz).startswith(b"\x1f\x8b"):
        raise ValueError("report_gz is not gzip data (RPT-17)")
    domain = _a_label(policy_domain, "policy_domain")
    sender = _a_label(submitter, "submitter")
    name = _header_value(filename, "filename")
    if not re.fullmatch(r"[A-Za-z0-9._!*-]+\.json\.gz", name) or name.split("!")[:2] != [sender, domain]:
        # RPT-18/RPT-22: the file name names the same submitter and policy domain as the headers.
        raise ValueError(f"filename {name!r} does not match submitter {sender} and domain {domain}")
    rid = _header_value(report_id, "report_id")
    rid = rid if rid.startswith("<") and rid.endswith(">") else f"<{rid}>"
    mid = _header_value(message_id, "message_id")
    mid = mid if mid.startswith("<") else f"<{mid}>"
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)

    text = MIMEPart(policy=_POLICY)
    text.set_content(
        "This is an aggregate TLS report (RFC 8460).\n\n"
        f"Submitter: {sender}\nPolicy domain: {domain}\nReport-ID: {rid}\nAttached file:\n  {name}\n",
        charset="us-ascii",
    )
    report = MIMEPart(policy=_POLICY)
    report.set_content(bytes(report_gz), maintype="application", subtype="tlsrpt+gzip",
                       disposition="attachment", filename=name)  # base64 by default
    boundary = "tlsrpt." + hashlib.sha256(b"\0".join(
        [bytes(report_gz), name.encode(), rid.encode(), mid.encode()])).hexdigest()[:40]

    msg = EmailMessage(policy=_POLICY)
    msg["From"] = _header_value(from_addr, "from_addr")
    msg["To"] = _header_value(to_addr, "to_addr")
    msg["Subject"] = f"Report Domain: {domain} Submitter: {sender} Report-ID: {rid}"
    msg["Date"] = format_datetime(now)
    msg["Message-ID"] = mid
    msg["TLS-Report-Domain"] = domain
    msg["TLS-Report-Submitter"] = sender
    msg["Auto-Submitted"] = "auto-generated"  # RFC 3834: no auto-replies to reports
    msg["MIME-Version"] = "1.0"
    msg["Content-Type"] = f'multipart/report; report-type="tlsrpt"; boundary="{boundary}"'
    msg.set_payload([text, report])
    return msg.as_bytes(policy=_POLICY)
