"""Parsers and checks of single configuration values: durations, sizes, host:port, and the
text of an MTA-STS override. Pure; `mta.config` applies them to every key and names the key."""

from __future__ import annotations

import math
import re
from typing import NoReturn

from mta.errors import ConfigError, MtaError

# ASCII digits only (`\d` would also take "٣٠s"), and \Z rather than $ (which allows a final "\n").
_DURATION = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)\Z")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE = re.compile(r"^([0-9]+)\s*(B|KB|MB|GB|KiB|MiB|GiB)?\Z", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "kib": 1024, "mib": 1024**2, "gib": 1024**3}


def parse_duration(text: str) -> float:
    """"30s" -> 30.0; raises ValueError. Units: ms, s, m, h, d."""
    m = _DURATION.match(text.strip())
    value = float(m.group(1)) * _DURATION_UNITS[m.group(2)] if m else math.nan
    if not math.isfinite(value):
        # float() turns 400 nines into inf instead of failing; an infinite timeout is not a duration.
        raise ValueError(f"\"{text}\" is not a duration (use e.g. 30s, 5m, 1h, 5d)")
    return value


def parse_size(text: str) -> int:
    """"25MB" -> 25000000; raises ValueError. Units: B, KB, MB, GB (SI) and KiB, MiB, GiB."""
    m = _SIZE.match(text.strip())
    if not m:
        raise ValueError(f"\"{text}\" is not a size (use e.g. 512KB, 25MB)")
    return int(m.group(1)) * _SIZE_UNITS[(m.group(2) or "b").lower()]


def parse_hostport(text: str) -> tuple[str, int]:
    """"127.0.0.1:2525" or "[::1]:2525" -> (host, port); raises ValueError."""
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:([0-9]{1,5})", text) or re.fullmatch(r"([^:\[\]\s]+):([0-9]{1,5})", text)
    if not m or not 0 <= int(m.group(2)) < 65536:
        raise ValueError(f"{text!r} is not host:port")
    return m.group(1), int(m.group(2))


def _fail(src: str, key: str, msg: str) -> NoReturn:
    """ConfigError naming the key, on one line (control characters escaped, as mta.config does)."""
    raise ConfigError("".join(c if c.isprintable() else repr(c)[1:-1] for c in f"{src}: {key}: {msg}"))


def check_override(src: str, key: str, value: str) -> None:
    """Issue 10 item 9 decision: an override is "none" or a complete policy text.

    A bare "testing"/"enforce" names no `mx` patterns, so it cannot be a policy (RFC 8461 §3.2
    needs at least one for those modes); rather than guess (the published policy with another
    mode would depend on the very discovery an override exists to replace), it is refused here,
    so check-config and serve agree.
    """
    from mta.sts.policy import parse_policy  # pure (no I/O); imported late to keep config at the bottom

    if value == "none":
        return
    if value in ("testing", "enforce"):
        _fail(src, key, f"{value!r} needs mx patterns: write the whole policy, e.g. "
                        f"\"version: STSv1\\nmode: {value}\\nmx: mx.example.org\\nmax_age: 86400\\n\"")
    if not value.startswith("version: STSv1"):
        _fail(src, key, f"{value!r} must be none or a policy text (starting with \"version: STSv1\")")
    try:
        parse_policy(value.encode("utf-8", "surrogateescape"))
    except MtaError as exc:
        _fail(src, key, f"invalid policy: {exc}")
