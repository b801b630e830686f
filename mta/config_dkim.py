"""The [dkim] section: its dataclasses and shape checks (mta.config builds and validates with them).

Kept apart from config.py so that module stays one screenful of sections; the rules are the same:
every problem names its key (`dkim.keys[1].algorithm`), and RFC 8460 §5.3 (RPT-18) makes a TLS
reporting setup without a key of the reporting domain a configuration error.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

DKIM_ALGORITHMS = ("rsa-sha256", "ed25519-sha256")


@dataclass(frozen=True)
class DkimKeyConfig:
    """One `[[dkim.keys]]` table: signs mail whose From: domain is `domain` or below it."""

    domain: str = ""
    selector: str = ""
    key_file: str = field(default="", metadata={"kind": "path"})
    algorithm: str = "rsa-sha256"


@dataclass(frozen=True)
class DkimConfig:
    enabled: bool = False
    headers: tuple[str, ...] = ("From", "To", "Cc", "Subject", "Date", "Message-ID", "Reply-To", "In-Reply-To",
                                "References", "MIME-Version", "Content-Type", "Content-Transfer-Encoding")
    oversign: tuple[str, ...] = ("From", "Subject", "Date", "To", "Cc")
    keys: tuple[DkimKeyConfig, ...] = ()


_DKIM_DOMAIN = re.compile(r"^(?=.{1,253}\Z)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.)*"
                          r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")
_HEADER_FIELD_NAME = re.compile(r"^[!-9;-~]+\Z")


def dkim_key_for(keys: tuple[DkimKeyConfig, ...], domain: str) -> DkimKeyConfig | None:
    """The key whose domain is `domain` or its closest parent (None: no key covers it)."""
    domain = domain.lower().rstrip(".")
    covering = [k for k in keys if domain == k.domain.lower() or domain.endswith("." + k.domain.lower())]
    return max(covering, key=lambda k: len(k.domain), default=None)


def validate_dkim(dk: DkimConfig, tlsrpt_enabled: bool, contact_info: str) -> Iterator[tuple[str, str]]:
    """(key, problem) for each problem of [dkim], first found first; config.py fails on the first.
    The key files themselves are read by mta.dkim.keys (check-config, serve: mta.preflight)."""
    for name, items in (("headers", dk.headers), ("oversign", dk.oversign)):
        for i, item in enumerate(items):
            if not _HEADER_FIELD_NAME.match(item):
                yield (f"dkim.{name}[{i}]", f"{item!r} is not a header field name")
    seen: set[tuple[str, str]] = set()
    for i, key in enumerate(dk.keys):
        where = f"dkim.keys[{i}]"
        if not _DKIM_DOMAIN.match(key.domain):
            yield (f"{where}.domain", f"{key.domain!r} is not a domain name (A-labels)")
        if not _DKIM_DOMAIN.match(key.selector):
            yield (f"{where}.selector", f"{key.selector!r} is not a selector (RFC 6376 §3.1)")
        if not key.key_file:
            yield (f"{where}.key_file", "a PEM private key file is required")
        if key.algorithm not in DKIM_ALGORITHMS:
            yield (f"{where}.algorithm", f"{key.algorithm!r} must be \"rsa-sha256\" or \"ed25519-sha256\"")
        if (key.domain.lower(), key.selector.lower()) in seen:
            yield (f"{where}.selector", f"{key.selector}._domainkey.{key.domain} is configured twice")
        seen.add((key.domain.lower(), key.selector.lower()))
    if dk.enabled and not dk.keys:
        yield ("dkim.keys", "dkim.enabled is true but no [[dkim.keys]] table is configured")
    if tlsrpt_enabled:
        # RFC 8460 §5.3 (RPT-18): a report sent by mail MUST carry a DKIM signature of the reporting
        # domain; rua=mailto: targets are only known at send time, so demand the key up front.
        _local, _, reporting = contact_info.removeprefix("mailto:").strip("<>").rpartition("@")
        if reporting and dkim_key_for(dk.keys, reporting) is None:
            yield ("dkim.keys", f"no key signs for the TLS reporting domain {reporting!r} (tlsrpt.contact_info); "
                   "RFC 8460 §5.3 requires report mails to be DKIM-signed: add a [[dkim.keys]] table for it")
