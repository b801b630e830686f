"""The opt-in draft-03 dialect (checklist section 8: SEED-1..13, SEED-S2..S5)."""

from __future__ import annotations

import json

import pytest

from mta.errors import StsPolicyError, StsRecordError
from mta.sts.draft03 import (
    DIALECT,
    DRAFT_POLICY_PATH,
    DRAFT_TXT_LABEL,
    parse_draft_policy,
    parse_draft_txt,
    select_draft_txt,
)
from mta.sts.policy import MAX_AGE_CAP, Policy, parse_policy, policy_to_text


def test_seed_1_6_31_names() -> None:
    """SEED-1/6/31: the draft record lives at mta-sts.<d>, the policy at /.well-known/mta-sts.json."""
    assert DRAFT_TXT_LABEL == "mta-sts"
    assert DRAFT_POLICY_PATH == "/.well-known/mta-sts.json"


@pytest.mark.parametrize(
    ("item", "text", "expected"),
    [
        ("SEED-2", "v=STSv1; id=20160831085700Z;", "20160831085700Z"),
        ("SEED-2", "v=STSv1;id=1", "1"),
        ("SEED-2", "v = STSv1 ; id = abc", "abc"),
        ("SEED-2", "v\t=\tSTSv1\t;\tid\t=\tabc;", "abc"),
        ("SEED-3", "V=STSv1; ID=1", "1"),
        ("SEED-3", "v=STSv1; Id=1", "1"),
        ("SEED-4", "v=STSv1; id=" + "z" * 32, "z" * 32),
    ],
)
def test_seed_2_3_4_valid_draft_records(item: str, text: str, expected: str) -> None:
    """SEED-2/3/4: v then id, case-insensitive names, WSP around `=` and `;`, optional trailing `;`."""
    assert parse_draft_txt(text).id == expected, item
    assert select_draft_txt([text]).id == expected, item


@pytest.mark.parametrize(
    ("item", "text"),
    [
        ("SEED-3", "v=stsv1; id=1"),  # STSv1 itself is case-sensitive
        ("SEED-2", "id=1; v=STSv1"),  # order is fixed
        ("SEED-2", "v=STSv1; id=1; ext=x"),  # no extension production in the draft grammar
        ("SEED-2", "v=STSv1; id=1 ;"),  # the trailing ";" follows the id directly
        ("SEED-2", "v=STSv1; id=1;;"),
        ("SEED-2", " v=STSv1; id=1"),
        ("SEED-2", "v=STSv1 id=1"),
        ("SEED-4", "v=STSv1; id="),
        ("SEED-4", "v=STSv1; id=" + "z" * 33),
        ("SEED-4", "v=STSv1; id=a_b"),
        ("SEED-2", "v=STSv10; id=1"),
    ],
)
def test_seed_2_3_4_invalid_draft_records(item: str, text: str) -> None:
    """SEED-2/3/4: anything else is not a usable draft record."""
    with pytest.raises(StsRecordError):
        parse_draft_txt(text)


@pytest.mark.parametrize(
    ("texts", "expected"),
    [
        (["v=spf1 -all", "v=STSv1; id=1"], "1"),
        (["v=STSv2; id=9", "V = STSv1; id=2"], "2"),
        (["v=STSv1; id=1", "v=STSv1; id=2"], None),
        (["v=STSv1; id=1", "V=STSv1; id=1"], None),
        ([], None),
        (["hello"], None),
        (["v=STSv1; id=bad_id"], None),
    ],
)
def test_seed_5_selection(texts: list[str], expected: str | None) -> None:
    """SEED-5: records not starting v=STSv1; are discarded; exactly one must remain and be valid."""
    if expected is None:
        with pytest.raises(StsRecordError):
            select_draft_txt(texts)
    else:
        assert select_draft_txt(texts).id == expected


def body(**fields: object) -> bytes:
    doc: dict[str, object] = {"version": "STSv1", "mode": "enforce", "mx": ["mail.example.com"], "max_age": 86400}
    doc.update(fields)
    return json.dumps({k: v for k, v in doc.items() if v is not ...}).encode()


def test_seed_7_example_policy() -> None:
    """SEED-7: the draft's JSON example becomes an RFC Policy labelled draft03 (SEED-S5)."""
    raw = b'{"version": "STSv1", "mode": "enforce", "mx": ["*.mail.example.com"], "max_age": 123456}'
    assert parse_draft_policy(raw) == Policy("enforce", ("*.mail.example.com",), 123456, DIALECT)
    assert DIALECT == "draft03"


@pytest.mark.parametrize(("mode", "expected"), [("report", "testing"), ("enforce", "enforce")])
def test_seed_8_mode_mapping(mode: str, expected: str) -> None:
    """SEED-8 / SEED-S3: report -> testing, enforce -> enforce."""
    assert parse_draft_policy(body(mode=mode)).mode == expected


@pytest.mark.parametrize("mode", ["testing", "none", "Report", "ENFORCE", "", 1, None, ...])
def test_seed_8_other_modes_invalid(mode: object) -> None:
    """SEED-8: the draft knows only report and enforce."""
    with pytest.raises(StsPolicyError):
        parse_draft_policy(body(mode=mode))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0),
        (86400, 86400),
        ("86400", 86400),
        ("0000604800", 604800),
        (31557601, MAX_AGE_CAP),
        (10**30, MAX_AGE_CAP),
        ("9" * 40, MAX_AGE_CAP),
        ("0" * 40 + "5", 5),
    ],
)
def test_seed_10_max_age(value: object, expected: int) -> None:
    """SEED-10 / SEED-S3: number or numeric string, no digit limit, capped at one year."""
    assert parse_draft_policy(body(max_age=value)).max_age == expected


@pytest.mark.parametrize("value", [-1, 1.5, 86400.0, "1.5", "-1", " 1", "", "1e3", True, None, [1], ...])
def test_seed_10_bad_max_age(value: object) -> None:
    """SEED-10: negative, fractional, boolean, missing or non-numeric max_age is invalid."""
    with pytest.raises(StsPolicyError):
        parse_draft_policy(body(max_age=value))


@pytest.mark.parametrize(
    ("mx", "expected"),
    [
        (["a.example", "*.b.example"], ("a.example", "*.b.example")),
        (["A.Example."], ("a.example",)),
        (["xn--bcher-kva.example"], ("xn--bcher-kva.example",)),
    ],
)
def test_seed_9_11_12_mx(mx: list[str], expected: tuple[str, ...]) -> None:
    """SEED-9/11/12 / SEED-S3: mx patterns use the RFC grammar and normalisation."""
    assert parse_draft_policy(body(mx=mx)).mx == expected


@pytest.mark.parametrize(
    "mx",
    [[], "a.example", ["mx*.example.com"], ["a.example", 5], ["bücher.example"], [["a.example"]], None, ...],
)
def test_seed_9_11_12_bad_mx(mx: object) -> None:
    """SEED-9: mx is always required (non-empty array); SEED-11/12: fragment wildcards and U-labels rejected."""
    with pytest.raises(StsPolicyError):
        parse_draft_policy(body(mx=mx))


@pytest.mark.parametrize("version", ["stsv1", "STSv2", 1, None, ...])
def test_seed_7_version_required(version: object) -> None:
    """SEED-7: version must be "STSv1"."""
    with pytest.raises(StsPolicyError):
        parse_draft_policy(body(version=version))


def test_seed_13_unknown_fields_ignored() -> None:
    """SEED-13: unknown members are ignored."""
    assert parse_draft_policy(body(extra={"a": [1, 2]}, policy_id="x")).mode == "enforce"


@pytest.mark.parametrize(
    "raw",
    [
        b'{"version": "STSv1", "mode": "report", "mode": "enforce", "mx": ["a.example"], "max_age": 1}',
        b'{"version": "STSv1", "mode": "enforce", "mx": ["a.example"], "max_age": 1, "x": {"k": 1, "k": 2}}',
    ],
)
def test_seed_13_s3_duplicate_keys_rejected(raw: bytes) -> None:
    """SEED-13 / SEED-S3: duplicate JSON keys (anywhere) make the policy invalid."""
    with pytest.raises(StsPolicyError):
        parse_draft_policy(raw)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"[]",
        b'"STSv1"',
        b"{",
        b"version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 1\n",  # RFC text is not the draft format
        b'\xef\xbb\xbf{"version": "STSv1", "mode": "enforce", "mx": ["a.example"], "max_age": 1}',
        b'{"version": "STSv1", "mode": "enforce", "mx": ["a.example"], "max_age": NaN}',
        b'{"version": "STSv1", "mode": "enforce", "mx": ["a.example"], "max_age": Infinity}',
        b'{"version": "STSv1", "mode": "enforce", "mx": ["a.example"], "max_age": 1, "n": "\xff"}',
        b"[" * 100000 + b"]" * 100000,
        b'{"max_age": ' + b"9" * 5000 + b"}",
    ],
)
def test_seed_7_s3_malformed_json(raw: bytes) -> None:
    """SEED-7 / SEED-S3: malformed, non-object, non-UTF-8 or non-standard JSON -> StsPolicyError only."""
    with pytest.raises(StsPolicyError):
        parse_draft_policy(raw)


def test_seed_s4_s5_cache_text_keeps_dialect() -> None:
    """SEED-S4/S5: a draft policy stored as RFC text reads back identically when its dialect is given."""
    policy = parse_draft_policy(body(mode="report", mx=["*.example.com", "b.example"], max_age="600"))
    assert policy == Policy("testing", ("*.example.com", "b.example"), 600, "draft03")
    assert parse_policy(policy_to_text(policy), dialect=policy.dialect) == policy
