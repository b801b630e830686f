"""Property tests: hostile input never escapes a parser's declared error type (hardening issue, part 6).

- config: `from_dict` on any nested dict of TOML value types and `load` on any bytes raise only
  ConfigError; `parse_duration` / `parse_size` / `parse_hostport` raise only ValueError.
- submission address helpers (SMTP-28 limits): `valid_address` and `strip_source_route` are total;
  `normalise_line_ends` leaves no bare CR or LF (SMTP-26); `add_submission_headers` (SMTP-43) is total
  and keeps a CRLF-clean message CRLF-clean.
- users file: `load_users` on any bytes raises only ConfigError.
Each property runs EXAMPLES examples (the report quotes this count).
"""

from __future__ import annotations

import datetime
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mta import config
from mta.errors import ConfigError
from mta.submission.auth import hash_password, load_users
from mta.submission.handler import (
    add_submission_headers,
    normalise_line_ends,
    strip_source_route,
    valid_address,
)

EXAMPLES = 400
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
_CRLF_CLEAN = re.compile(rb"(?:[^\r\n]|\r\n)*")

# --- TOML-shaped data -------------------------------------------------------------------------
# Keys the loader knows (so the fuzzer gets past "unknown key" and into the converters) plus noise.
_KNOWN_KEYS = sorted({
    "hostname", "submission", "queue", "delivery", "dns", "tls", "mta_sts", "tlsrpt", "log", "source",
    "listen", "implicit_tls_listen", "relay_networks", "max_message_size", "max_recipients", "max_connections",
    "idle_timeout", "tls_cert", "tls_key", "users_file", "allow_insecure_auth", "auth_failure_delay", "path",
    "smtp_port", "retry_intervals", "max_queue_lifetime", "bounce_lifetime", "delay_warning", "concurrency",
    "per_domain_concurrency", "ipv6", "connect_timeout", "command_timeout", "data_timeout",
    "connection_reuse_time", "relayhost", "relayhost_tls", "relayhost_username", "relayhost_password_file",
    "nameservers", "port", "timeout", "ca_file", "enabled", "https_port", "cache_path", "fetch_timeout",
    "refresh_interval", "draft03_compat", "overrides", "organization_name", "contact_info", "report_sender",
    "send_hour_utc", "max_random_delay", "record_all_sessions", "db_path", "format", "level",
})
# Strings that reach the interesting branches: durations, sizes, addresses, networks, paths.
_NEAR_MISS = [
    "30s", "5m", "1.5h", "0s", "250ms", "9" * 400 + "d", "٣s", "1e3s", "25MB", "1KiB", "0", "9" * 5000,
    "127.0.0.1:25", "[::1]:25", "127.0.0.1:99999", "10.0.0.0/8", "10.0.0.0/33", "::1/128", "a\x00b",
    "/dev/null", "../x", "", " ", "enforce", "version: STSv1", "verify", "may", "json", "text", "info",
    "relay.example", "a@b", "127.0.0.1:2525\n", "x" * 5000,
]
toml_text = st.one_of(st.text(max_size=40), st.sampled_from(_NEAR_MISS))
toml_scalars = st.one_of(
    toml_text,
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.datetimes(),
    st.datetimes(timezones=st.just(datetime.UTC)),
    st.dates(),
    st.times(),
)
toml_keys = st.one_of(st.sampled_from(_KNOWN_KEYS), st.text(max_size=12))
toml_values = st.recursive(
    toml_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(toml_keys, children, max_size=5),
    max_leaves=20,
)
toml_tables = st.dictionaries(toml_keys, toml_values, max_size=6)


@st.composite
def config_shaped(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly-right configs: real section and key names with hostile values."""
    out: dict[str, Any] = {}
    for section in draw(st.lists(st.sampled_from(["submission", "delivery", "dns", "tls", "mta_sts", "tlsrpt",
                                                  "log", "queue"]), max_size=4, unique=True)):
        out[section] = draw(st.dictionaries(st.sampled_from(_KNOWN_KEYS), toml_values, max_size=5))
    if draw(st.booleans()):
        out["hostname"] = draw(toml_values)
    return out


@FUZZ
@given(data=st.one_of(toml_tables, config_shaped()))
@example(data={"tls": {"ca_file": "a\x00b"}})  # regression: an embedded NUL escaped as ValueError
@example(data={"submission": {"idle_timeout": "9" * 400 + "s"}})  # regression: 400 nines became an infinite timeout
@example(data={"\n": []})  # found by the fuzzer: a key holding "\n" made a two-line ConfigError
def test_config_from_dict_raises_only_config_error(data: dict[str, Any], tmp_path: Path) -> None:
    """Config rule: any TOML-typed input gives a Config or one ConfigError line, nothing else."""
    try:
        cfg = config.from_dict(data, "fuzz.toml", tmp_path)
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.toml: ")
        assert "\n" not in str(exc).split(": ", 2)[1]
        return
    assert isinstance(cfg, config.Config)
    assert cfg.submission.idle_timeout > 0 and cfg.submission.idle_timeout != float("inf")


# TOML-ish fragments make random bytes far more likely to parse and reach the schema.
_TOML_BITS = [b"[submission]\n", b"[delivery]\n", b"[mta_sts.overrides]\n", b"listen = ", b"idle_timeout = ",
              b'"30s"', b'"a\\u0000b"', b"[", b"]", b"{", b"}", b"=", b'"', b"\n", b"\xff", b"1" * 5000,
              b"ca_file = ", b"[tls]\n", b"1979-05-27T07:32:00Z", b"nan", b"inf", b"true", b"0x1f", b","]
toml_bytes = st.one_of(
    st.binary(max_size=300),
    st.lists(st.one_of(st.sampled_from(_TOML_BITS), st.binary(max_size=8)), max_size=25).map(b"".join),
)


@FUZZ
@given(raw=toml_bytes)
@example(raw=b"a = " + b"[" * 5000)  # regression: RecursionError escaped from tomllib
@example(raw=b"a = " + b"1" * 5000)  # regression: int() digit-limit ValueError from tomllib
@example(raw=b'[tls]\nca_file = "a\\u0000b"\n')  # regression: NUL in a path
def test_config_load_raises_only_config_error(raw: bytes, tmp_path: Path) -> None:
    """Config rule: any bytes in the config file -> a Config or ConfigError naming the file."""
    path = tmp_path / "c.toml"
    path.write_bytes(raw)
    try:
        config.load(path)
    except ConfigError as exc:
        assert str(exc).startswith(f"{path}: ")


@FUZZ
@given(text=st.one_of(st.text(max_size=30), st.sampled_from(_NEAR_MISS),
                      st.from_regex(r"\A[0-9]{1,400}(\.[0-9]{1,5})?(ms|s|m|h|d)\Z")))
@example(text="٣٠s")
def test_parse_duration_raises_only_value_error(text: str) -> None:
    """Durations are finite, non-negative and written in ASCII digits, or ValueError."""
    try:
        value = config.parse_duration(text)
    except ValueError:
        return
    assert 0 <= value < float("inf")
    assert re.fullmatch(r"[0-9.]+(ms|s|m|h|d)", text.strip())


@FUZZ
@given(text=st.one_of(st.text(max_size=30), st.sampled_from(_NEAR_MISS),
                      st.from_regex(r"\A[0-9]{1,5000} ?(B|KB|MB|GB|KiB|MiB|GiB|kb|mib)?\Z")))
def test_parse_size_raises_only_value_error(text: str) -> None:
    try:
        value = config.parse_size(text)
    except ValueError:
        return
    assert value >= 0 and re.match(r"[0-9]", text.strip())


@FUZZ
@given(text=st.one_of(st.text(max_size=30), st.sampled_from(_NEAR_MISS)))
@example(text="127.0.0.1:25\n")
def test_parse_hostport_raises_only_value_error(text: str) -> None:
    try:
        host, port = config.parse_hostport(text)
    except ValueError:
        return
    assert 0 <= port < 65536 and "\n" not in host and text.endswith(str(port))


# --- submission helpers (SMTP-26/28/43) -------------------------------------------------------
_ADDR_ALPHABET = st.sampled_from([*"ab.@%!:,\"\\[]<> -_\x00\r\n\t\x7f\u0085é\udc80\ud800", "xn--", "@a,@b:"])
addresses = st.one_of(st.text(max_size=80), st.lists(_ADDR_ALPHABET, max_size=40).map("".join),
                      st.builds(lambda a, b: a + "@" + b, st.text(max_size=70), st.text(max_size=260)))


@FUZZ
@given(address=addresses)
@example(address="a\x00b@src.test")
@example(address="x\rb@dst.test")
@example(address="a" * 64 + "@" + "b" * 189)
def test_smtp_28_valid_address_is_total_and_keeps_limits(address: str) -> None:
    """SMTP-28: local-part <= 64, domain <= 255, path <= 256; no control characters (hardening)."""
    ok = valid_address(address)
    assert isinstance(ok, bool)
    if ok:
        local, _, domain = address.rpartition("@")
        assert 0 < len(local) <= 64 and 0 < len(domain) <= 255 and len(address) <= 254
        assert not re.search(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]", address)


@FUZZ
@given(address=addresses)
@example(address="@a,@b:user@d")
@example(address="@:")  # found by the fuzzer: an empty route is not a route (the test was wrong)
def test_strip_source_route_is_total(address: str) -> None:
    out = strip_source_route(address)
    assert isinstance(out, str) and address.endswith(out)
    if re.match(r"@[^:]+:", address):
        assert out == address.split(":", 1)[1]
    else:
        assert out == address


line_bytes = st.one_of(st.binary(max_size=300),
                       st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b".", b"a", b"\x00", b"\n.\n", b"\r.\r"]),
                                max_size=60).map(b"".join))


@FUZZ
@given(data=line_bytes)
@example(data=b"\r\r\n\n\r")
def test_smtp_26_normalise_line_ends_leaves_no_bare_cr_or_lf(data: bytes) -> None:
    out = normalise_line_ends(data)
    assert _CRLF_CLEAN.fullmatch(out)
    # Only line ends change: the other octets are kept in order (a relay must not alter content).
    assert out.replace(b"\r\n", b"") == data.replace(b"\r\n", b"").replace(b"\r", b"").replace(b"\n", b"")
    assert normalise_line_ends(out) == out


_HOSTNAMES = st.from_regex(r"\A[a-z0-9]([a-z0-9.-]{0,30}[a-z0-9])?\Z")


@FUZZ
@given(data=line_bytes, received=st.one_of(st.text(max_size=80),
                                          st.sampled_from(["x\r\nBcc: evil@x", "a\rb\n\n", "\udc80\ud800", ""])),
       hostname=_HOSTNAMES, now=st.floats(min_value=0, max_value=4e9))
@example(data=b"Subject: x\r\n\r\nbody\r\n", received="from c\rBcc: evil ([127.0.0.9])", hostname="r", now=0.0)
def test_smtp_43_add_submission_headers_is_total(data: bytes, received: str, hostname: str, now: float) -> None:
    """SMTP-43: a Received field is prepended; whatever `received` holds, it cannot add a header
    of its own, end the header section or leave a bare CR/LF (SMTP-26)."""
    out = add_submission_headers(data, received=received, hostname=hostname, now=now)
    assert out.startswith(b"Received: ") and out.endswith(data)
    added = out[: len(out) - len(data)]
    assert _CRLF_CLEAN.fullmatch(added)
    # The added fields end in CRLF; an extra empty line only when `data` had no header section.
    fields = added[:-2] if added.endswith(b"\r\n\r\n") else added
    assert fields.endswith(b"\r\n") and b"\r\n\r\n" not in fields
    names = [ln.split(b":", 1)[0] for ln in fields.split(b"\r\n") if ln and ln[:1] not in (b" ", b"\t")]
    assert set(names) <= {b"Received", b"Message-ID", b"Date"} and names.count(b"Received") == 1
    if _CRLF_CLEAN.fullmatch(data):
        assert _CRLF_CLEAN.fullmatch(out)


# --- users file --------------------------------------------------------------------------------
_GOOD_ENTRY = "alice:" + hash_password("s3cret", salt=b"\x01" * 16)
users_bytes = st.one_of(
    st.binary(max_size=200),
    st.lists(st.one_of(st.sampled_from([_GOOD_ENTRY.encode(), b"bob:scrypt$16384$8$1$AAAA$AAAA", b"#c", b"",
                                        b"x:scrypt$$$$$", b"y:scrypt$3$8$1$!!$??", b"z:scrypt$99999999999$1$1$a$b",
                                        b"w:scrypt$16384$8$99999999$AAAA$AAAA", b":scrypt$1$1$1$1$1", b"\xff\xfe"]),
                       st.binary(max_size=20)), max_size=6).map(b"\n".join),
)


@FUZZ
@given(raw=users_bytes)
@example(raw=b"\xff")  # regression: UnicodeDecodeError escaped
def test_users_file_raises_only_config_error(raw: bytes, tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_bytes(raw)
    try:
        users = load_users(str(path))
    except ConfigError as exc:
        assert str(exc).startswith(str(path))
        return
    for user, stored in users.items():
        assert user and ":" not in user and stored.startswith("scrypt$")


def test_users_file_good_entry_loads(tmp_path: Path) -> None:
    """Control for the property above: a real entry is accepted, so the property is not vacuous."""
    path = tmp_path / "users"
    path.write_text(_GOOD_ENTRY + "\n# comment\n\n")
    assert load_users(str(path)) == {"alice": _GOOD_ENTRY.split(":", 1)[1]}


@pytest.mark.parametrize("address", ["a@b.example", "user@[192.0.2.1]", '"a b"@c.example', "ü@exämple.de"])
def test_smtp_28_valid_address_control_accepts_real_addresses(address: str) -> None:
    """Control: the property above is not satisfied by a validator that refuses everything."""
    assert valid_address(address)
