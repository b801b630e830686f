"""Property tests for the pure MTA-STS core: hostile input never escapes the parsers' own error types.

Items: STS-12/53 (any TXT text / policy bytes -> a value or StsRecordError/StsPolicyError), SEED-S3
(draft JSON likewise), STS-67..72 (matching never raises; identities hold), STS-39/46 (round trip
through any line-ending/whitespace rendering), STS-55..60 (decide is total and keeps its invariants).
"""

from __future__ import annotations

import contextlib
import json
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from mta.errors import StsPolicyError, StsRecordError
from mta.model import TlsInfo
from mta.sts.decide import (
    Action,
    CacheEntry,
    Decision,
    TxtOutcome,
    check_tls,
    decide,
    filter_mx,
)
from mta.sts.draft03 import parse_draft_policy, parse_draft_txt, select_draft_txt
from mta.sts.policy import (
    MAX_AGE_CAP,
    Policy,
    StsRecord,
    mx_matches,
    parse_policy,
    parse_txt_record,
    policy_to_text,
    select_txt_record,
)

EXAMPLES = 400
FUZZ = settings(max_examples=EXAMPLES, deadline=None)

# --- building blocks -------------------------------------------------------------------------
_ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
labels = st.builds(
    lambda first, middle, last: first + middle + last if middle or last else first,
    st.sampled_from(_ALNUM),
    st.text(_ALNUM + "-", max_size=8),
    st.sampled_from(_ALNUM) | st.just(""),
).filter(lambda s: not s.endswith("-"))
domains = st.lists(labels, min_size=1, max_size=4).map(".".join)
patterns = st.one_of(domains, domains.map(lambda d: "*." + d))


@st.composite
def policies(draw: st.DrawFn) -> Policy:
    mode = draw(st.sampled_from(["enforce", "testing", "none"]))
    mx = draw(st.lists(patterns, min_size=0 if mode == "none" else 1, max_size=5))
    max_age = draw(st.integers(min_value=0, max_value=MAX_AGE_CAP))
    return Policy(mode, tuple(p.lower() for p in mx), max_age)


record_pieces = st.sampled_from(
    ["v=STSv1", "v=STSv1;", ";", " ", "\t", "id=", "id=1", "id=abc", "ext=x", "=", "ID=1", "a_b", "é", "\x00", "\n"]
)
txt_fields = st.sampled_from(["id=abc", "id=1", "id=Z9", "ext=x", "x.y-z=ok!", "ID=1", "id=a_b", "foo", "=1", "id="])
txt_delims = st.sampled_from([";", "; ", " ;", "\t;\t", ";", "; ", ";;", " "])


@st.composite
def txt_records(draw: st.DrawFn) -> str:
    """Records assembled from fields and delimiters, so both valid and invalid ones come up often."""
    fields = draw(st.lists(txt_fields, min_size=1, max_size=4))
    delims = draw(st.lists(txt_delims, min_size=len(fields) + 1, max_size=len(fields) + 1))
    text = draw(st.sampled_from(["v=STSv1", "v=STSv1", "v=STSv1 ", "V=STSv1", " v=STSv1", "v=STSv10"]))
    for delim, field in zip(delims, fields, strict=False):
        text += delim + field
    if draw(st.booleans()):
        text += delims[-1]
    return text


noise_lines = st.sampled_from(
    [
        "foo: bar baz",
        "x-vendor.ext: 1",
        "mode: enforce",
        "mode: report",
        "mode: Enforce",
        "mx: *.",
        "mx: bücher.example",
        "mx: *.example.net",
        "max_age: 99999999999",
        "max_age: -1",
        "version: STSv2",
        " mode: enforce",
        "",
        "\x00",
        "mx:",
        "note: grüße",
    ]
)
line_ends = st.sampled_from(["\n", "\r\n", "\n", "\r\n", "\r", " \n", "\t\r\n", "\r\r\n"])


@st.composite
def policy_bodies(draw: st.DrawFn) -> bytes:
    """A valid policy's lines, shuffled, with some noise lines and odd line ends mixed in."""
    lines = draw(policies()).lines()
    lines = draw(st.permutations(lines))
    for _ in range(draw(st.integers(0, 2))):
        lines.insert(draw(st.integers(0, len(lines))), draw(noise_lines))
    ends = draw(st.lists(line_ends, min_size=len(lines), max_size=len(lines)))
    body = "".join(line + end for line, end in zip(lines, ends, strict=True))
    if draw(st.booleans()):
        body = body.rstrip("\r\n")
    return body.encode("utf-8")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
draft_docs = st.fixed_dictionaries(
    {
        "version": st.sampled_from(["STSv1", "STSv1", "STSv1", "stsv1", 1]),
        "mode": st.sampled_from(["report", "enforce", "report", "enforce", "testing", None]),
        "mx": st.lists(patterns, min_size=1, max_size=3)
        | st.lists(patterns | st.text(max_size=10), max_size=3)
        | json_values,
        "max_age": st.integers(min_value=-5, max_value=10**12) | st.text("0123456789", max_size=14) | json_values,
    },
    optional={"x": json_values, "mx ": json_values, "policy_id": st.text(max_size=5)},
)

# --- parsers raise only their own error -----------------------------------------------------


@FUZZ
@given(st.binary(max_size=400) | policy_bodies())
def test_sts_53_parse_policy_any_bytes(body: bytes) -> None:
    """STS-53: any bytes give a Policy or StsPolicyError, never another exception."""
    try:
        policy = parse_policy(body)
    except StsPolicyError:
        return
    assert policy.mode in ("enforce", "testing", "none")
    assert 0 <= policy.max_age <= MAX_AGE_CAP
    assert policy.mode == "none" or policy.mx
    assert parse_policy(policy_to_text(policy)) == policy


@FUZZ
@given(st.text(max_size=200) | st.lists(record_pieces, max_size=12).map("".join) | txt_records())
def test_sts_12_parse_txt_record_any_text(text: str) -> None:
    """STS-12: any text gives a StsRecord or StsRecordError."""
    try:
        record = parse_txt_record(text)
    except StsRecordError:
        return
    assert isinstance(record, StsRecord)
    assert text.startswith("v=STSv1") and 1 <= len(record.id) <= 32 and record.id.isalnum()


@FUZZ
@given(st.lists(st.text(max_size=60) | txt_records(), max_size=4))
def test_sts_11_select_txt_record_any_rrset(texts: list[str]) -> None:
    """STS-11/12: any RRset gives one record or StsRecordError; a result implies exactly one STS record."""
    try:
        record = select_txt_record(texts)
    except StsRecordError:
        return
    assert sum(t.startswith("v=STSv1") for t in texts) >= 1
    assert isinstance(record, StsRecord)


@FUZZ
@given(st.binary(max_size=300) | draft_docs.map(lambda d: json.dumps(d).encode()))
def test_seed_s3_parse_draft_policy_any_bytes(body: bytes) -> None:
    """SEED-S3: any bytes give a draft03 Policy or StsPolicyError."""
    try:
        policy = parse_draft_policy(body)
    except StsPolicyError:
        return
    assert policy.dialect == "draft03"
    assert policy.mode in ("enforce", "testing") and policy.mx
    assert 0 <= policy.max_age <= MAX_AGE_CAP


@FUZZ
@given(st.text(max_size=80) | st.lists(record_pieces, max_size=8).map("".join), st.lists(st.text(max_size=40)))
def test_seed_2_5_draft_txt_any_text(text: str, texts: list[str]) -> None:
    """SEED-2/5: draft TXT parsing and selection raise only StsRecordError."""
    with contextlib.suppress(StsRecordError):
        assert isinstance(parse_draft_txt(text), StsRecord)
    with contextlib.suppress(StsRecordError):
        assert isinstance(select_draft_txt([*texts, text]), StsRecord)


# --- matching -------------------------------------------------------------------------------


@FUZZ
@given(st.text(max_size=60), st.text(max_size=60))
def test_sts_72_mx_matches_never_raises(host: str, pattern: str) -> None:
    """STS-67..72: arbitrary text on either side returns a bool."""
    assert mx_matches(host, pattern) in (True, False)


@FUZZ
@given(domains, labels)
def test_sts_67_68_69_70_matching_identities(domain: str, label: str) -> None:
    """STS-67/68/69/70, ID-1/3: exact, case, trailing-dot and one-label-wildcard identities."""
    assert mx_matches(domain, domain)
    assert mx_matches(domain.upper() + ".", domain.lower())
    assert mx_matches(domain, domain + ".")
    assert not mx_matches(domain, "*." + domain)  # never the bare domain
    assert not mx_matches(f"{label}.{label}.{domain}", "*." + domain)  # exactly one label
    assert not mx_matches("*." + domain, "*." + domain)  # the host is never a pattern
    if "." in domain:
        assert mx_matches(f"{label}.{domain}".upper(), "*." + domain)
        assert not mx_matches(f"{label}{domain}", "*." + domain)


# --- round trip -----------------------------------------------------------------------------


@FUZZ
@given(policies(), st.sampled_from(["\n", "\r\n"]), st.sampled_from(["", " ", "\t", " \t "]), st.randoms())
def test_sts_39_46_round_trip(policy: Policy, end: str, pad: str, rnd: object) -> None:
    """STS-39/40/46: canonical text round-trips; any order, LF/CRLF and trailing WSP parse the same."""
    assert parse_policy(policy_to_text(policy)) == policy
    lines = policy.lines()
    head, mx_lines = [ln for ln in lines if not ln.startswith("mx:")], [ln for ln in lines if ln.startswith("mx:")]
    rnd.shuffle(head)  # type: ignore[attr-defined]
    body = end.join(ln + pad for ln in head + mx_lines)
    assert parse_policy(body.encode()) == policy


# --- decide is total ------------------------------------------------------------------------

times = st.floats(allow_nan=True, allow_infinity=True) | st.floats(min_value=0, max_value=2e9)
ids = st.sampled_from(["A", "B", "C"]) | st.text(max_size=4)
entries = st.builds(
    CacheEntry,
    domain=st.just("example.com"),
    txt_id=ids,
    policy=policies(),
    fetched_at=times,
    expires_at=times,
    failed_id=st.none() | ids,
    failed_at=st.none() | times,
)
txts = st.builds(
    TxtOutcome, kind=st.sampled_from(["record", "none", "error"]) | st.text(max_size=6), id=st.none() | ids
)


@FUZZ
@given(st.none() | entries, txts, times)
def test_sts_55_60_decide_is_total(cached: CacheEntry | None, txt: TxtOutcome, now: float) -> None:
    """STS-55..60: decide answers every input, and never applies an expired entry or fetches without a record."""
    decision = decide(cached, txt, now)
    assert isinstance(decision, Decision) and decision.reason
    if decision.entry is not None:
        assert decision.entry is cached and cached.fresh(now)
    if decision.action is Action.USE_CACHED:
        assert decision.entry is not None
    if decision.action is Action.NO_POLICY:
        assert decision.entry is None
    if decision.action is Action.FETCH:
        assert txt.kind == "record" and txt.id
    if cached is not None and cached.fresh(now) and txt.kind != "record":
        assert decision.action is Action.USE_CACHED  # STS-56/57
    if math.isnan(now):
        assert decision.action is not Action.USE_CACHED


@FUZZ
@given(
    st.none() | policies(),
    st.lists(st.text(max_size=30) | domains, max_size=5),
    st.booleans(),
    st.none() | st.builds(TlsInfo, st.none() | st.text(max_size=8), st.none(), st.booleans(), st.none() | st.text()),
)
def test_sts_74_84_verdicts_total(policy: Policy | None, hosts: list[str], offered: bool, tls: TlsInfo | None) -> None:
    """STS-74/84/85: verdicts exist for any input; only enforce ever refuses."""
    verdicts = filter_mx(policy, hosts)
    assert [v.host for v in verdicts] == hosts
    verdict = check_tls(policy, offered, tls)
    if policy is None or policy.mode != "enforce":
        assert verdict.ok and all(v.allowed for v in verdicts)
    if policy is None or policy.mode == "none":
        assert verdict.result_type is None
