"""MTA-STS record and policy parsing (RFC 8461 §3.1, §3.2) and MX pattern matching (§4.1).

Rule: every input is parsed into a typed value or rejected with this package's own error
(`StsRecordError` for the `_mta-sts` TXT record, `StsPolicyError` for the policy body), whatever
the bytes are; matching is then done on the normalised value only.

Choices where the RFC leaves room (checklist section 9), all lenient only where strictness would
silently downgrade a domain to "no policy":

- STS-19: a record is an STS record when it starts with `v=STSv1`, optional spaces/tabs, `;`.
- STS-22: `id` given twice -> the first one wins.
- Issue 10 item 5: trailing spaces/tabs after the last field without a `;` (`v=STSv1; id=abc `)
  are outside the ABNF: the record is invalid (STS-12). Strictness costs nothing here: a cached
  policy still applies (STS-56), and whoever can add the space could delete the record instead.
- A field whose name is a known one (`id`; `version`, `mode`, `max_age`, `mx`) must carry a valid
  value; it is never re-read as an extension field (STS-12, STS-44, STS-50).
- STS-47: blank lines inside a policy are rejected; trailing blank lines/whitespace are tolerated.
- STS-49: `max_age` above one year is clamped to MAX_AGE_CAP.
- STS-52: one trailing dot on an `mx` value is stripped.
- ID-9: a wildcard pattern over a single label (`*.com`) never matches anything.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from mta import idn
from mta.errors import StsPolicyError, StsRecordError

MAX_AGE_CAP = 31557600  # RFC 8461 §3.2: max_age is at most one year (STS-49)

TXT_LABEL = "_mta-sts"  # RFC 8461 §3.1: the record lives at _mta-sts.<policy-domain>
POLICY_HOST_LABEL = "mta-sts"  # §3.2: https://mta-sts.<policy-domain>/...
POLICY_PATH = "/.well-known/mta-sts.txt"  # §3.2 (the draft used .json, SEED-6)

_WSP = " \t"

# --- TXT record grammar (RFC 8461 §3.1) -------------------------------------------------------
_STS_PREFIX = re.compile(r"v=STSv1[ \t]*;")  # STS-13/14/15/19: exact, case-sensitive, no leading space
_TXT_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_FIELD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,31}")  # sts-ext-name / sts-policy-ext-name
_TXT_EXT_VALUE = re.compile(r"[\x21-\x3a\x3c\x3e-\x7e]+")  # printable ASCII except "=", ";" and space

# --- policy body grammar (RFC 8461 §3.2) ------------------------------------------------------
_POLICY_LINE = re.compile(r"([A-Za-z0-9][A-Za-z0-9_.\-]{0,31}):[ \t]*(.*)", re.S)
_MAX_AGE = re.compile(r"[0-9]{1,10}")  # 1*10DIGIT; ASCII only (Python's \d would take other digits)
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?")  # RFC 5321 sub-domain
_HOST_LABEL = re.compile(r"[A-Za-z0-9_-]+")  # an MX name label as DNS may return it (no "*", STS-72)
_MODES = ("enforce", "testing", "none")
_KNOWN_POLICY_FIELDS = ("version", "mode", "max_age", "mx")


@dataclass(frozen=True)
class StsRecord:
    """A usable `_mta-sts` TXT record: its `id` and any extension fields (ignored, STS-17)."""

    id: str
    extensions: tuple[tuple[str, str], ...] = ()


def parse_txt_record(text: str) -> StsRecord:
    """Parse one TXT record (its character-strings already joined, STS-20).

    Grammar: `v=STSv1` then one or more `;`-delimited fields (spaces/tabs allowed around `;`),
    one optional trailing `;`. Raises StsRecordError for anything else (STS-12).
    """
    if not isinstance(text, str) or not text.startswith("v=STSv1"):
        raise StsRecordError("record does not start with v=STSv1")
    parts = text[len("v=STSv1") :].split(";")
    # parts[0] is what sits between the version and the first ";": spaces/tabs only.
    if len(parts) < 2 or parts[0].strip(_WSP):
        raise StsRecordError("v=STSv1 is not followed by ';'")
    fields = parts[1:]
    if not fields[-1].strip(_WSP):
        fields = fields[:-1]  # one optional trailing delimiter (with the spaces/tabs it may carry)
    elif fields[-1].rstrip(_WSP) != fields[-1]:
        # Issue 10 item 5 [DECISION]: in the §3.1 ABNF, whitespace only occurs inside
        # sts-field-delim (*WSP ";" *WSP), so `id=abc ` with no ";" after it is outside the grammar,
        # and §3.1 says a syntactically invalid record MUST mean "no policy".
        raise StsRecordError("whitespace after the last field must be followed by ';'")
    if not fields:
        raise StsRecordError("record has no fields")
    record_id: str | None = None
    extensions: list[tuple[str, str]] = []
    for raw in fields:
        field = raw.strip(_WSP)
        name, eq, value = field.partition("=")
        if not eq or not _FIELD_NAME.fullmatch(name):
            raise StsRecordError(f"malformed field {field[:40]!r}")
        if name == "id":
            if not _TXT_ID.fullmatch(value):
                raise StsRecordError("id must be 1 to 32 letters or digits")
            if record_id is None:  # STS-22 [DECISION]: the first id wins
                record_id = value
        elif _TXT_EXT_VALUE.fullmatch(value):
            extensions.append((name, value))
        else:
            raise StsRecordError(f"malformed value for extension {name!r}")
    if record_id is None:
        raise StsRecordError("record has no id field")
    return StsRecord(record_id, tuple(extensions))


def is_sts_record(text: str) -> bool:
    """Whether a TXT record counts as an STS record at all (STS-10/13/14/15/19)."""
    return isinstance(text, str) and _STS_PREFIX.match(text) is not None


def select_txt_record(texts: Sequence[str]) -> StsRecord:
    """Pick the one usable STS record out of an RRset (RFC 8461 §3.1).

    Records not starting `v=STSv1;` are ignored (STS-10); zero or several STS records
    (STS-11), or an invalid one (STS-12), raise StsRecordError.
    """
    candidates = [t for t in texts if is_sts_record(t)]
    if not candidates:
        raise StsRecordError("no v=STSv1 record")
    if len(candidates) > 1:
        raise StsRecordError(f"{len(candidates)} v=STSv1 records")
    return parse_txt_record(candidates[0])


@dataclass(frozen=True)
class Policy:
    """A valid policy. `mx` holds the patterns as written, lower-cased, trailing dot removed."""

    mode: str
    mx: tuple[str, ...]
    max_age: int
    dialect: str = "rfc8461"

    def lines(self) -> list[str]:
        """The policy as TLS-RPT `policy-string` lines, one `mx` per element (RPT-9, RPT-14)."""
        return [
            "version: STSv1",
            f"mode: {self.mode}",
            *(f"mx: {pattern}" for pattern in self.mx),
            f"max_age: {self.max_age}",
        ]

    def allows(self, mx_host: str) -> bool:
        """Whether any pattern matches the MX host name (STS-71)."""
        return any(mx_matches(mx_host, pattern) for pattern in self.mx)


def parse_mx_pattern(value: str) -> str:
    """Validate one `mx` value, `["*."] Domain`, and normalise it (lower case, no trailing dot).

    Raises StsPolicyError (STS-50, STS-51); shared with the draft-03 dialect (SEED-S3).
    """
    normal = _normalise_pattern(value)
    if normal is None:
        raise StsPolicyError(f"invalid mx pattern {value[:80]!r}")
    return normal


def _normalise_pattern(value: str) -> str | None:
    if not isinstance(value, str) or not value.isascii():
        return None  # STS-51: U-labels are not allowed, only A-labels
    if value.endswith("."):
        value = value[:-1]  # STS-52 [DECISION]: one trailing dot is tolerated
    domain = value[2:] if value.startswith("*.") else value
    if not domain or not all(_LABEL.fullmatch(label) for label in domain.split(".")):
        return None
    return value.lower()


def _value_ok(value: str) -> bool:
    """sts-policy-ext-value: visible chars (UTF-8 allowed) and inner spaces; no controls."""
    if not value or value[0] == " " or value[-1] == " ":
        return False
    return all(c == " " or (c > " " and not "\x7f" <= c <= "\x9f") for c in value)


def parse_policy(body: bytes | str, *, dialect: str = "rfc8461") -> Policy:
    """Parse a policy body (RFC 8461 §3.2). Raises StsPolicyError and nothing else.

    Lines end in LF or CRLF, mixed freely (STS-39); field order is free (STS-40); unknown
    fields are ignored (STS-41); for duplicated non-`mx` fields the first wins (STS-42).
    `dialect` only labels the result (used when re-reading a cached draft-03 policy).
    """
    try:
        raw = body.encode("utf-8") if isinstance(body, str) else bytes(body)
        text = raw.decode("utf-8")  # STS-53: non-UTF-8 is invalid; a BOM fails the name check
    except (UnicodeError, TypeError, ValueError) as exc:
        raise StsPolicyError("policy is not UTF-8 text") from exc
    # STS-47 [DECISION]: trailing blank lines / whitespace are common in the wild; tolerate them.
    text = text.rstrip(" \t\r\n")
    if not text:
        raise StsPolicyError("policy is empty")
    found: dict[str, str] = {}
    patterns: list[str] = []
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines(): only LF/CRLF end a line
        if line.endswith("\r"):
            line = line[:-1]  # CRLF; any other CR stays and is rejected below (STS-46)
        m = _POLICY_LINE.fullmatch(line)
        if m is None:
            raise StsPolicyError(f"line {number}: not a 'name: value' field")
        name, value = m.group(1), m.group(2).rstrip(_WSP)
        if not _value_ok(value):
            raise StsPolicyError(f"line {number}: empty or malformed value for {name!r}")
        if name == "mx":
            patterns.append(parse_mx_pattern(value))
        elif name in _KNOWN_POLICY_FIELDS:
            _check_known(name, value, number)
            found.setdefault(name, value)  # STS-42: the first occurrence wins
    for name in ("version", "mode", "max_age"):
        if name not in found:
            raise StsPolicyError(f"policy has no {name} field")  # STS-43
    mode = found["mode"]
    if mode != "none" and not patterns:
        raise StsPolicyError(f"mode {mode} needs at least one mx field")  # STS-43
    max_age = min(int(found["max_age"]), MAX_AGE_CAP)  # STS-49 [DECISION]: clamp
    return Policy(mode, tuple(patterns), max_age, dialect)


def _check_known(name: str, value: str, number: int) -> None:
    if name == "version" and value != "STSv1":
        raise StsPolicyError(f"line {number}: version must be STSv1")
    if name == "mode" and value not in _MODES:
        raise StsPolicyError(f"line {number}: mode must be enforce, testing or none")  # STS-44/45
    if name == "max_age" and not _MAX_AGE.fullmatch(value):
        raise StsPolicyError(f"line {number}: max_age must be 1 to 10 digits")  # STS-48


def policy_to_text(policy: Policy) -> str:
    """Canonical policy text (for the cache); `parse_policy(text, dialect=p.dialect) == p`."""
    return "\n".join(policy.lines()) + "\n"


def _ascii_host(host: str) -> str | None:
    """The host name in lower-case A-label form without one trailing dot, or None if unusable."""
    if not isinstance(host, str):
        return None
    if not host.isascii():
        try:  # ID-2: compare in A-label form (mta.idn: IDNA 2008, as DNS queries and reports use)
            host = idn.to_ascii(host)
        except ValueError:
            return None
    if host.endswith("."):
        host = host[:-1]  # STS-70: DNS returns absolute names
    if not all(_HOST_LABEL.fullmatch(label) for label in host.split(".")):
        return None  # STS-72: the MX name is never itself a pattern ("*" is not a host label)
    return host.lower()


def mx_matches(host: str, pattern: str) -> bool:
    """Whether an MX host name matches one policy `mx` pattern (RFC 8461 §4.1, RFC 6125 §6.4).

    Case-insensitive (STS-69, ID-1), one trailing dot ignored on both sides (STS-70); `*.`
    stands for exactly one whole leftmost label and never matches the bare domain (STS-68,
    ID-3); any other `*` makes the pattern match nothing (ID-4, ID-5); so does `*.<tld>` (ID-9).
    """
    name = _ascii_host(host)
    normal = _normalise_pattern(pattern) if isinstance(pattern, str) else None
    if name is None or normal is None:
        return False
    if not normal.startswith("*."):
        return name == normal
    base = normal[2:].split(".")
    if len(base) < 2:
        return False  # ID-9: a wildcard over a public suffix
    labels = name.split(".")
    return len(labels) == len(base) + 1 and labels[1:] == base
