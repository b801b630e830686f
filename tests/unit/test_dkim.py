"""The pure DKIM parts: key choice (select.py), relaxed canonicalisation and h= (sign.py), key records."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from mta.dkim import keys, select, sign


@dataclass(frozen=True)
class K:
    domain: str
    name: str = ""


KEYS = (K("example.org", "rsa"), K("example.org", "ed"), K("mail.example.org", "sub"), K("other.net", "o"))


@pytest.mark.parametrize(("froms", "signers", "reason"), [
    (["a@example.org"], ["rsa", "ed"], ""),  # DKIM-4: both keys of the domain (dual signature)
    (["Alice <a@EXAMPLE.org>"], ["rsa", "ed"], ""),
    (["a@news.example.org"], ["rsa", "ed"], ""),  # DKIM-5: a subdomain is signed by the parent's key
    (["a@x.mail.example.org"], ["sub"], ""),  # the most specific configured domain wins
    (["a@mail.example.org"], ["sub"], ""),
    (['"x@other.net" <a@example.org>'], ["rsa", "ed"], ""),  # the address, not the display name
    (["a@notexample.org"], [], "no key for notexample.org"),  # a suffix that is not a label boundary
    (["a@unknown.test"], [], "no key for unknown.test"),
    ([], [], "no From: field"),
    (["a@example.org", "b@example.org"], [], "several From: fields"),
    (["a@example.org, b@example.org"], [], "several From: addresses"),
    (["undisclosed"], [], "From: address has no domain"),
    ([""], [], "no address in From:"),
])
def test_dkim_5_which_keys_sign(froms: list[str], signers: list[str], reason: str) -> None:
    choice = select.choose_keys(froms, KEYS)
    assert [k.name for k in choice.keys] == signers and choice.reason == reason


def test_dkim_2_rfc6376_3_4_5_relaxed_example() -> None:
    """DKIM-2: the worked example of RFC 6376 §3.4.5."""
    message = b"A: X\r\nB : Y\t\r\n\tZ  \r\n\r\n C \r\nD \t E\r\n\r\n\r\n"
    fields, body = sign.split_message(message)
    assert [sign.relaxed_header(n, v) for n, v in fields] == [b"a:X", b"b:Y Z"]
    assert sign.relaxed_body(body) == b" C\r\nD E\r\n"


@pytest.mark.parametrize(("body", "canonical"), [
    (b"", b""),
    (b"\r\n\r\n", b""),
    (b"no final line end", b"no final line end\r\n"),
    (b"a \t b\t\r\n\r\nc\r\n\r\n", b"a b\r\n\r\nc\r\n"),
    ("ünï  code\r\n".encode(), "ünï code\r\n".encode()),
])
def test_dkim_2_relaxed_body(body: bytes, canonical: bytes) -> None:
    assert sign.relaxed_body(body) == canonical


def test_dkim_1_h_lists_every_instance_and_oversigns() -> None:
    fields, _ = sign.split_message(b"From: a@b\r\nTo: x@y\r\nReceived: r\r\nTo: z@y\r\nX-Other: o\r\n\r\nbody")
    names = sign.signed_names(fields, headers=["From", "To", "Subject", "Reply-To"], oversign=["From", "Subject"])
    # From twice (one + oversign), To twice (both present), Subject once (absent, oversigned), no Reply-To.
    assert names == ["from", "from", "to", "to", "subject"]
    assert sign.signed_names([], headers=["To"], oversign=[]) == ["from"]  # RFC 6376 §5.4: From always


def test_header_without_body_separator_and_non_field_lines() -> None:
    fields, body = sign.split_message(b"From: a@b\r\nnot a field\r\n")
    assert fields == [(b"From", b" a@b"), (b"", b"not a field")] and body == b""
    assert sign.split_message(b"\r\nonly body") == ([], b"only body")


def test_dkim_8_zone_line_splits_into_255_octet_strings() -> None:
    private = keys.generate("rsa-sha256", 4096)
    value = keys.record_value(private)
    line = keys.zone_line("example.org.", "sel", value)
    assert line.startswith('sel._domainkey.example.org. IN TXT "v=DKIM1; k=rsa; p=')
    strings = line.split(" IN TXT ", 1)[1].split('" "')
    assert len(strings) == len(value) // 255 + 1 and all(len(s.strip('"')) <= 255 for s in strings)
    assert "".join(s.strip('"') for s in strings) == value


def test_record_matching() -> None:
    a = keys.LoadedKey("example.org", "s", "ed25519-sha256", keys.generate("ed25519-sha256"))
    b = keys.LoadedKey("example.org", "s", "ed25519-sha256", keys.generate("ed25519-sha256"))
    assert keys.record_matches(keys.record_value(a.private), a) == (True, "")
    assert keys.record_matches(keys.record_value(b.private), a) == (False, "p= is a different public key")
    assert keys.record_matches("v=DKIM1; k=rsa; p=AAAA", a) == (False, "k=rsa but the key is ed25519")
    assert keys.record_matches("v=DKIM1; k=ed25519; p=", a) == (False, "p= is empty (the key is revoked)")
    assert keys.record_matches("v=DKIM1; p=A; p=B", a)[1] == "record is malformed: duplicate tag p="
    with pytest.raises(ValueError, match="bits"):
        keys.generate("rsa-sha256", 512)


@pytest.mark.parametrize("value", ["a@b.example", " Name <a@b.example> ", "J. R. Doe <j.r+x@Mail.B.example>",
                                   "a@b.example (comment)", '"Doe, J" <j@b.example>', "<a@b.example>",
                                   "Jörg <j@b.example>", "a@b.example.", "x <a@b.example", "a @b.example"])
def test_dkim_5_fast_from_parse_agrees_with_the_email_package(value: str) -> None:
    """select.py reads plain From: fields with a regex; it must give what email.utils gives."""
    import email.utils

    addresses = [a for _n, a in email.utils.getaddresses([value]) if a]
    expected = addresses[0].rpartition("@")[2].lower().rstrip(".") if len(addresses) == 1 else None
    got, _why = select.from_domain([value])
    assert got == (expected or None)
