"""Plain data shared by every layer: replies, TLS facts, recipient states.

Pure: no I/O, no clock. Values are immutable.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from dataclasses import dataclass

_ENHANCED = re.compile(r"([245]\.\d{1,3}\.\d{1,3})(?:\s+|$)(.*)", re.S)


class RecipientStatus(enum.StrEnum):
    """Where one recipient of a spooled message stands."""

    QUEUED = "queued"
    DEFERRED = "deferred"
    DELIVERED = "delivered"
    BOUNCED = "bounced"

    @property
    def final(self) -> bool:
        return self in (RecipientStatus.DELIVERED, RecipientStatus.BOUNCED)


@dataclass(frozen=True)
class SmtpReply:
    """An SMTP reply: code, optional enhanced status (RFC 3463) and text."""

    code: int
    text: str = ""
    enhanced: str | None = None

    @classmethod
    def parse(cls, code: int, message: str) -> SmtpReply:
        """Split a leading enhanced status code off the reply text."""
        first = message.strip()
        m = _ENHANCED.match(first)
        if m and m.group(1)[0] == str(code)[0]:
            return cls(code, m.group(2).strip(), m.group(1))
        return cls(code, first, None)

    @property
    def transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    @property
    def status(self) -> str:
        """The RFC 3463 status: the enhanced code, else one derived from the class."""
        if self.enhanced:
            return self.enhanced
        return {2: "2.0.0", 4: "4.0.0", 5: "5.0.0"}.get(self.code // 100, "4.0.0")

    def __str__(self) -> str:
        parts = [str(self.code)]
        if self.enhanced:
            parts.append(self.enhanced)
        if self.text:
            parts.append(self.text)
        return " ".join(parts)


@dataclass(frozen=True)
class TlsInfo:
    """What TLS a delivery session actually got."""

    version: str | None = None  # "TLSv1.3", None = plaintext
    cipher: str | None = None
    verified: bool = False  # peer certificate chains to a trusted root and names the MX host
    error: str | None = None  # why verification failed, if it did

    @property
    def label(self) -> str:
        return self.version or "none"


#: `MxAnswer.kind` values.
MX = "mx"  # one or more real MX records
NULL = "null"  # RFC 7505 null MX: the domain accepts no mail
IMPLICIT = "implicit"  # no MX RRset; the domain itself is the single MX (SMTP-4)


@dataclass(frozen=True)
class MxAnswer:
    """The outcome of an MX lookup that did not fail.

    `records` are (preference, host) with the host lower-case and without a trailing dot; the root
    (".") only appears for kind "null". It lives here, below both, because `mta.net.dns` produces
    it and `mta.delivery.route` consumes it: the DNS adapter must not import the delivery layer.
    """

    kind: str
    records: tuple[tuple[int, str], ...] = ()
    secure: bool = False  # DNSSEC-validated (DANE-1); always False without [dns] dnssec


def parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP address `text` spells, else None. Asked of every MX name on every delivery, so a
    host name is told apart without the two exceptions `ipaddress.ip_address` raises for it
    (about 45 µs per delivery, issue 18): an IPv6 literal has a colon, an IPv4 one only digits
    and dots; anything else that passes that test is left to `ipaddress`."""
    if ":" not in text and not text.replace(".", "").isdigit():
        return None
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None
