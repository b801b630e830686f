"""RFC 8461 TXT record, policy body and MX pattern rules (checklist 1B, 1D, 1F, section 2)."""

from __future__ import annotations

import pytest

from mta.errors import StsPolicyError, StsRecordError
from mta.sts.policy import (
    MAX_AGE_CAP,
    POLICY_PATH,
    TXT_LABEL,
    Policy,
    StsRecord,
    is_sts_record,
    parse_mx_pattern,
    parse_policy,
    parse_txt_record,
    policy_to_text,
    select_txt_record,
)

# --- 1B: TXT record -------------------------------------------------------------------------

VALID_RECORDS = [
    ("STS-8", "v=STSv1; id=20160831085700Z;", "20160831085700Z"),
    ("STS-8", "v=STSv1; id=20160831085700Z", "20160831085700Z"),
    ("STS-16", "v=STSv1; foo=bar; id=1", "1"),
    ("STS-17", "v=STSv1; id=1; ext=x.y-z", "1"),
    ("STS-18", "v=STSv1;id=1", "1"),
    ("STS-18", "v=STSv1;   id=1   ;", "1"),
    ("STS-18", "v=STSv1;\tid=1", "1"),
    ("STS-18", "v=STSv1;\tid=1\t;\t", "1"),
    ("STS-19", "v=STSv1 ; id=1", "1"),
    ("STS-19", "v=STSv1\t;id=1", "1"),
    ("STS-22", "v=STSv1; id=1; id=2", "1"),
    ("STS-12", "v=STSv1; id=" + "a" * 32, "a" * 32),
    ("STS-12", "v=STSv1; id=AbC123", "AbC123"),
]


@pytest.mark.parametrize(("item", "text", "expected"), VALID_RECORDS)
def test_sts_8_16_17_18_19_22_valid_txt_records(item: str, text: str, expected: str) -> None:
    """STS-8/16/17/18/19/22: records in the RFC grammar give their (first) id."""
    assert parse_txt_record(text).id == expected, item
    assert select_txt_record([text]).id == expected, item


INVALID_RECORDS = [
    ("STS-12", "v=STSv1;"),
    ("STS-12", "v=STSv1; id="),
    ("STS-12", "v=STSv1; id=abc_def"),
    ("STS-12", "v=STSv1; id=" + "a" * 33),
    ("STS-12", "v=STSv1; id=a b"),
    ("STS-12", "v=STSv1;;id=1"),
    ("STS-12", "v=STSv1; id=1; foo"),
    ("STS-12", "v=STSv1; id=1;;"),
    ("STS-12", "v=STSv1; id=1; foo=a=b"),
    ("STS-12", "v=STSv1; id=1; foo=a b"),
    ("STS-12", "v=STSv1; id=1; _x=1"),
    ("STS-12", "v=STSv1; id=1; " + "n" * 33 + "=1"),
    ("STS-12", "v=STSv1; id=1; foo=bär"),
    ("STS-12", "v=STSv1; id=1\n"),
    ("STS-12", "v=STSv1; id=é"),
    ("STS-12", "v=STSv1; foo=bar"),
    ("STS-12", "v=STSv1 id=1"),
    ("STS-12", "v=STSv1"),
    ("STS-13", "v=STSv10; id=1"),
    ("STS-13", "v=STSv2; id=1"),
    ("STS-14", "V=STSv1; id=1"),
    ("STS-14", "v=stsv1; id=1"),
    ("STS-14", "v=STSv1; ID=1"),
    ("STS-15", " v=STSv1; id=1"),
    ("STS-16", "id=1; v=STSv1"),
    ("STS-22", "v=STSv1; id=1; id=bad_id"),
]


@pytest.mark.parametrize(("item", "text"), INVALID_RECORDS)
def test_sts_12_13_14_15_16_invalid_txt_records(item: str, text: str) -> None:
    """STS-12..16: records outside the grammar are not usable."""
    with pytest.raises(StsRecordError):
        parse_txt_record(text)
    with pytest.raises(StsRecordError):
        select_txt_record([text])


@pytest.mark.parametrize(
    ("text", "is_sts"),
    [
        ("v=STSv1; id=1", True),
        ("v=STSv1;", True),  # an STS record, though an invalid one (STS-12)
        ("v=STSv1 ; id=1", True),  # STS-19 [DECISION]
        ("v=STSv10; id=1", False),  # STS-13
        ("v=STSv2; id=1", False),
        ("V=STSv1; id=1", False),  # STS-14
        ("v=stsv1; id=1", False),
        (" v=STSv1; id=1", False),  # STS-15
        ("v=STSv1", False),  # does not begin with "v=STSv1;"
        ("v=spf1 -all", False),  # STS-10
        ("", False),
    ],
)
def test_sts_10_13_14_15_19_which_records_count(text: str, is_sts: bool) -> None:
    """STS-10/13/14/15/19: only records starting `v=STSv1` + optional WSP + `;` are STS records."""
    assert is_sts_record(text) is is_sts


def test_sts_10_other_records_ignored() -> None:
    """STS-10: a non-STS record beside the STS record is ignored."""
    assert select_txt_record(["v=spf1 -all", "v=STSv1; id=1"]).id == "1"
    assert select_txt_record(["v=STSv10; id=9", "v=STSv1; id=1", " v=STSv1; id=3"]).id == "1"


@pytest.mark.parametrize(
    "texts",
    [
        ["v=STSv1; id=1", "v=STSv1; id=1"],
        ["v=STSv1; id=1", "v=STSv1; id=2"],
        ["v=STSv1; id=1", "v=STSv1;"],  # an invalid second record still counts
        ["v=STSv1; id=1", "v=STSv1 ; id=2"],
    ],
)
def test_sts_11_several_sts_records_unusable(texts: list[str]) -> None:
    """STS-11: two records starting `v=STSv1;` -> no usable record."""
    with pytest.raises(StsRecordError, match="records"):
        select_txt_record(texts)


@pytest.mark.parametrize("texts", [[], ["v=spf1 -all"], ["v=STSv2; id=1", "hello"]])
def test_sts_9_no_sts_record(texts: list[str]) -> None:
    """STS-9: no STS record in the RRset -> StsRecordError (the caller treats it as no policy)."""
    with pytest.raises(StsRecordError):
        select_txt_record(texts)


def test_sts_20_joined_character_strings() -> None:
    """STS-20: the caller joins character-strings with no separator; the joined text parses."""
    joined = "".join(["v=STSv1; i", "d=abc"])
    assert select_txt_record([joined]).id == "abc"


def test_sts_17_extensions_kept_but_not_needed() -> None:
    """STS-17: extension fields are accepted and kept apart from the id."""
    record = parse_txt_record("v=STSv1; a.b_c-d=x!y~; id=7; Z9=?")
    assert record == StsRecord("7", (("a.b_c-d", "x!y~"), ("Z9", "?")))


def test_sts_12_extension_value_excludes_equals_semicolon_space() -> None:
    """STS-12: an extension value with `=` or an empty value makes the record invalid."""
    for text in ("v=STSv1; id=7; e=", "v=STSv1; id=7; e=a=b", "v=STSv1; id=7; =x"):
        with pytest.raises(StsRecordError):
            parse_txt_record(text)


def test_sts_23_ids_are_plain_strings() -> None:
    """STS-23: ids are kept verbatim (no numeric interpretation), so `9` and `10` simply differ."""
    assert parse_txt_record("v=STSv1; id=09").id == "09"
    assert parse_txt_record("v=STSv1; id=10").id != parse_txt_record("v=STSv1; id=9").id


def test_sts_1_names() -> None:
    """STS-1/25: the record label and policy path are the RFC ones (not the draft's, SEED-1/6)."""
    assert TXT_LABEL == "_mta-sts"
    assert POLICY_PATH == "/.well-known/mta-sts.txt"


# --- 1D: policy body ------------------------------------------------------------------------

EXAMPLE_LINES = [
    "version: STSv1",
    "mode: enforce",
    "mx: mail.example.com",
    "mx: *.example.net",
    "mx: backupmx.example.com",
    "max_age: 604800",
]
EXAMPLE = Policy("enforce", ("mail.example.com", "*.example.net", "backupmx.example.com"), 604800)


@pytest.mark.parametrize(
    "body",
    [
        "\r\n".join(EXAMPLE_LINES) + "\r\n",
        "\n".join(EXAMPLE_LINES) + "\n",
        "\n".join(EXAMPLE_LINES),
        "\r\n".join(EXAMPLE_LINES),
        "\r\n".join(EXAMPLE_LINES[:3]) + "\n" + "\n".join(EXAMPLE_LINES[3:]),  # mixed endings
    ],
)
def test_sts_39_example_policy_line_endings(body: str) -> None:
    """STS-39: CRLF, LF, mixed and no final newline all parse to the same policy."""
    assert parse_policy(body.encode()) == EXAMPLE


def test_sts_40_field_order_irrelevant() -> None:
    """STS-40: max_age first and version last is fine."""
    body = b"max_age: 604800\nmx: mail.example.com\nmode: testing\nversion: STSv1\n"
    assert parse_policy(body) == Policy("testing", ("mail.example.com",), 604800)


def test_sts_41_unknown_fields_ignored() -> None:
    """STS-41: unknown fields, including UTF-8 and inner spaces in the value, are ignored."""
    body = "version: STSv1\nfoo: bar baz\nx-vendor.ext: 1\nmode: none\nnote: grüße aus köln\nmax_age: 1\n"
    assert parse_policy(body.encode()) == Policy("none", (), 1)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("mode: testing\nmode: enforce\n", ("testing", 86400)),
        ("mode: enforce\nmode: testing\n", ("enforce", 86400)),
        ("mode: testing\nmax_age: 5\nmax_age: 6\n", ("testing", 5)),
        ("version: STSv1\nmode: none\n", ("none", 86400)),
    ],
)
def test_sts_42_first_duplicate_wins(extra: str, expected: tuple[str, int]) -> None:
    """STS-42: duplicated non-mx fields -> the first one wins."""
    body = ("version: STSv1\n" + extra + "max_age: 86400\nmx: a.example\n").encode()
    policy = parse_policy(body)
    assert (policy.mode, policy.max_age) == expected


def test_sts_42_duplicate_with_bad_value_rejected() -> None:
    """STS-42 with our [DECISION]: a later duplicate must still be well-formed (known names are typed)."""
    with pytest.raises(StsPolicyError):
        parse_policy(b"version: STSv1\nmode: enforce\nmode: Enforce\nmx: a.example\nmax_age: 1\n")


def test_sts_42_all_mx_lines_count() -> None:
    """STS-42: every mx line counts, in order, duplicates kept as written."""
    body = b"version: STSv1\nmode: enforce\nmx: b.example\nmax_age: 1\nmx: a.example\nmx: b.example\n"
    assert parse_policy(body).mx == ("b.example", "a.example", "b.example")


@pytest.mark.parametrize(
    "body",
    [
        "mode: enforce\nmx: a.example\nmax_age: 1\n",  # no version
        "version: STSv1\nmx: a.example\nmax_age: 1\n",  # no mode
        "version: STSv1\nmode: enforce\nmx: a.example\n",  # no max_age
        "version: STSv1\nmode: enforce\nmax_age: 1\n",  # enforce without mx
        "version: STSv1\nmode: testing\nmax_age: 1\n",  # testing without mx
    ],
)
def test_sts_43_missing_required_field(body: str) -> None:
    """STS-43: a missing required field makes the policy invalid."""
    with pytest.raises(StsPolicyError):
        parse_policy(body.encode())


def test_sts_43_mode_none_without_mx_is_valid() -> None:
    """STS-43/65: mode none needs no mx."""
    assert parse_policy(b"version: STSv1\nmode: none\nmax_age: 86400\n") == Policy("none", (), 86400)


@pytest.mark.parametrize(
    ("item", "line"),
    [
        ("STS-44", "mode: Enforce"),
        ("STS-44", "mode: ENFORCE"),
        ("STS-44", "Mode: enforce"),  # an unknown field, so mode is missing
        ("STS-45", "mode: report"),
        ("STS-44", "mode: enforce testing"),
    ],
)
def test_sts_44_45_mode_values_case_sensitive(item: str, line: str) -> None:
    """STS-44/45: mode values are exact and case-sensitive; `report` is draft-only."""
    body = f"version: STSv1\n{line}\nmx: a.example\nmax_age: 1\n"
    with pytest.raises(StsPolicyError):
        parse_policy(body.encode())


@pytest.mark.parametrize("line", ["version: stsv1", "version: STSv2", "Version: STSv1", "version: STSv1 x"])
def test_sts_44_version_value_exact(line: str) -> None:
    """STS-44: version must be exactly `STSv1` under the name `version`."""
    body = f"{line}\nmode: enforce\nmx: a.example\nmax_age: 1\n"
    with pytest.raises(StsPolicyError):
        parse_policy(body.encode())


@pytest.mark.parametrize(
    ("mode_line", "valid"),
    [
        ("mode:enforce", True),
        ("mode:   enforce\t", True),
        ("mode:\tenforce  ", True),
        ("mode: enforce\r", True),  # this is CRLF after LF-splitting: CR removed, not kept
        (" mode: enforce", False),
        ("mode : enforce", False),
        ("\tmode: enforce", False),
        ("mode: enforce\r\r", False),
        ("mode: en\rforce", False),
        ("mode: enforce\x00", False),
        ("mode:", False),
        ("mode:   ", False),
        ("mode enforce", False),
    ],
)
def test_sts_46_whitespace(mode_line: str, valid: bool) -> None:
    """STS-46: WSP after the colon and after the value is fine; before the name or colon it is not."""
    body = f"version: STSv1\n{mode_line}\nmx: a.example\nmax_age: 1\n".encode()
    if valid:
        assert parse_policy(body).mode == "enforce"
    else:
        with pytest.raises(StsPolicyError):
            parse_policy(body)


def test_sts_46_crlf_never_leaves_cr_in_values() -> None:
    """STS-46: every value is clean after CRLF splitting (classic `enforce\\r` bug)."""
    policy = parse_policy(b"version: STSv1\r\nmode: testing\r\nmx: a.example\r\nmax_age: 42\r\n")
    assert policy == Policy("testing", ("a.example",), 42)


@pytest.mark.parametrize(
    ("body", "valid"),
    [
        ("version: STSv1\n\nmode: none\nmax_age: 1\n", False),  # internal blank line
        ("version: STSv1\r\n\r\nmode: none\r\nmax_age: 1\r\n", False),
        ("version: STSv1\n \nmode: none\nmax_age: 1\n", False),  # whitespace-only line
        ("\nversion: STSv1\nmode: none\nmax_age: 1\n", False),  # leading blank line
        ("version: STSv1\nmode: none\nmax_age: 1\n\n\n", True),  # trailing blank lines
        ("version: STSv1\nmode: none\nmax_age: 1\r\n\r\n \t\r\n", True),
        ("version: STSv1\nmode: none\nmax_age: 1   ", True),
    ],
)
def test_sts_47_blank_lines(body: str, valid: bool) -> None:
    """STS-47 [DECISION]: internal blank lines rejected, trailing blank lines/whitespace tolerated."""
    if valid:
        assert parse_policy(body.encode()) == Policy("none", (), 1)
    else:
        with pytest.raises(StsPolicyError):
            parse_policy(body.encode())


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0", 0),
        ("0000604800", 604800),
        ("1", 1),
        ("31557600", 31557600),
        ("31557601", MAX_AGE_CAP),  # STS-49
        ("99999999", MAX_AGE_CAP),
        ("9999999999", MAX_AGE_CAP),
        ("-1", None),
        ("1.5", None),
        ("86400s", None),
        ("", None),
        ("12345678901", None),
        ("+5", None),
        ("١٢٣", None),  # Arabic-Indic digits are not DIGIT
        ("8 6400", None),
    ],
)
def test_sts_48_49_max_age(value: str, expected: int | None) -> None:
    """STS-48: max_age is 1..10 ASCII digits; STS-49 [DECISION]: values above one year are clamped."""
    body = f"version: STSv1\nmode: none\nmax_age: {value}\n".encode()
    if expected is None:
        with pytest.raises(StsPolicyError):
            parse_policy(body)
    else:
        assert parse_policy(body).max_age == expected


@pytest.mark.parametrize(
    ("item", "value", "expected"),
    [
        ("STS-50", "*.example.com", "*.example.com"),
        ("STS-50", "mail.example.com", "mail.example.com"),
        ("STS-50", "192.0.2.1", "192.0.2.1"),  # [DECISION] grammatical, accepted, never matches
        ("STS-50", "a-b.c-d.example", "a-b.c-d.example"),
        ("STS-50", "x", "x"),
        ("STS-51", "xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("STS-52", "mail.example.com.", "mail.example.com"),
        ("STS-52", "*.example.com.", "*.example.com"),
        ("STS-69", "Mail.Example.COM", "mail.example.com"),
    ],
)
def test_sts_50_51_52_valid_mx(item: str, value: str, expected: str) -> None:
    """STS-50/51/52: valid mx values, normalised (lower case, one trailing dot removed)."""
    assert parse_mx_pattern(value) == expected, item
    body = f"version: STSv1\nmode: enforce\nmx: {value}\nmax_age: 1\n".encode()
    assert parse_policy(body).mx == (expected,), item


@pytest.mark.parametrize(
    ("item", "value"),
    [
        ("STS-50", "mx*.example.com"),
        ("STS-50", "foo.*.example.com"),
        ("STS-50", "*"),
        ("STS-50", "*."),
        ("STS-50", "*.*.example.com"),
        ("STS-50", "**.example.com"),
        ("STS-50", "mail_1.example.com"),
        ("STS-50", "-bad.example.com"),
        ("STS-50", "bad-.example.com"),
        ("STS-50", "a..example.com"),
        ("STS-50", ".example.com"),
        ("STS-50", "mail.example.com.."),
        ("STS-50", "mail example.com"),
        ("STS-50", "."),
        ("STS-50", "https://mail.example.com"),
        ("STS-51", "bücher.example"),
        ("ID-5", "xn--*.example"),
    ],
)
def test_sts_50_51_invalid_mx_makes_policy_invalid(item: str, value: str) -> None:
    """STS-50/51: one bad mx value makes the whole policy invalid."""
    with pytest.raises(StsPolicyError):
        parse_mx_pattern(value)
    body = f"version: STSv1\nmode: enforce\nmx: good.example\nmx: {value}\nmax_age: 1\n".encode()
    with pytest.raises(StsPolicyError):
        parse_policy(body)


@pytest.mark.parametrize(
    "body",
    [
        b"\xef\xbb\xbfversion: STSv1\nmode: none\nmax_age: 1\n",  # UTF-8 BOM
        b"version: STSv1\x00\nmode: none\nmax_age: 1\n",
        b"version: STSv1\nmode: none\nmax_age: 1\n\x00",
        b"version: STSv1\nmode: none\nmax_age: 1\nnote: \xff\xfe\n",  # not UTF-8
        b"version: STSv1\nmode: none\nmax_age: 1\nnote: a\x7fb\n",  # DEL
        "version: STSv1\nmode: none\nmax_age: 1\nnote: a\x85b\n".encode(),  # C1 control
        b"version: STSv1\nmode: none\nmax_age: 1\nnote: a\tb\n",  # tab inside a value
        b"version: STSv1\rmode: none\rmax_age: 1\r",  # CR-only line ends
        b"",
        b"\r\n",
    ],
)
def test_sts_53_bad_bytes_invalid(body: bytes) -> None:
    """STS-53: BOM, NUL, controls and non-UTF-8 bytes make the body invalid."""
    with pytest.raises(StsPolicyError):
        parse_policy(body)


def test_sts_54_policy_error_type() -> None:
    """STS-54/92: an invalid body is reported as sts-policy-invalid."""
    with pytest.raises(StsPolicyError) as info:
        parse_policy(b"nonsense")
    assert info.value.result_type == "sts-policy-invalid"


def test_sts_41_extension_name_rules() -> None:
    """STS-41: extension names follow sts-policy-ext-name (<= 32 chars, first alnum)."""
    base = "version: STSv1\nmode: none\nmax_age: 1\n"
    assert parse_policy((base + "a" * 32 + ": x\n").encode()).mode == "none"
    for bad in ("a" * 33 + ": x", "_x: y", "x y: z", "é: x", ": x"):
        with pytest.raises(StsPolicyError):
            parse_policy((base + bad + "\n").encode())


def test_parse_policy_accepts_str_and_labels_dialect() -> None:
    """SEED-S5: re-reading cached text can keep the dialect label."""
    text = "version: STSv1\nmode: testing\nmx: a.example\nmax_age: 3\n"
    assert parse_policy(text) == Policy("testing", ("a.example",), 3)
    assert parse_policy(text, dialect="draft03").dialect == "draft03"


def test_rpt_9_policy_lines_and_text_round_trip() -> None:
    """RPT-9/RPT-14: policy-string lines, one mx per element; cache text parses back identically."""
    assert EXAMPLE.lines() == EXAMPLE_LINES
    assert parse_policy(policy_to_text(EXAMPLE)) == EXAMPLE
    none = Policy("none", (), 0)
    assert none.lines() == ["version: STSv1", "mode: none", "max_age: 0"]
    assert parse_policy(policy_to_text(none)) == none
