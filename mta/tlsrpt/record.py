"""Parse the `_smtp._tls.<policy-domain>` TXT record set of RFC 8460 §3 (RPT-1..7).

Rule: of the TXT records at the name, only those starting with ``v=TLSRPTv1`` followed by ``;``
(spaces or tabs allowed before it) count; the others are ignored. Exactly one must count, or no
report is sent (RPT-4). It needs a ``rua=`` field (RPT-6) of comma-separated URIs; only ``mailto:``
and ``https:`` URIs are kept (RPT-7) and at least one must remain. Unknown ``name=value`` fields
are ignored (RPT-6). ``v=`` and ``rua=`` are case-sensitive; a repeated ``rua=`` is ignored (the
first wins, as for MTA-STS fields).

Inside a URI the record grammar forces ``,`` ``!`` and ``;`` to be percent-encoded (``%2C``, ``%21``,
``%3B``), which is what lets the record be split at raw ``,`` and ``;``. The escapes are ordinary URI
percent-encoding, so the URIs are kept verbatim: an ``https:`` URI is used exactly as published
(RFC 3986 §2.2: decoding a reserved character would change the URI), and a ``mailto:`` URI is
decoded only when its addresses are read (RFC 6068 §2: split at raw ``,`` first, then decode, so
``mailto:a%2Cb@x`` is the single address ``a,b@x``).

Pure: no I/O; the DNS adapter passes the record texts in.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from mta.errors import MtaError


class TlsRptRecordError(MtaError, ValueError):
    """The `_smtp._tls` TXT record set yields no usable reporting address (no reports are sent)."""


_VERSION = re.compile(r"v=TLSRPTv1[ \t]*(?:;|$)")
_FIELD_DELIM = re.compile(r"[ \t]*;[ \t]*")
_URI_DELIM = re.compile(r"[ \t]*,[ \t]*")
# tlsrpt-ext-name of RFC 8460 §3
_EXT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")


@dataclass(frozen=True)
class TlsRptRecord:
    """A usable TLSRPT record: the report URIs, in record order (RPT-1..3)."""

    rua: tuple[str, ...]

    @property
    def mailto(self) -> tuple[str, ...]:
        """The mail addresses of the `mailto:` URIs (RFC 6068: percent-decoded, no query)."""
        return tuple(a for uri in self.rua if _scheme(uri) == "mailto" for a in mailto_addresses(uri))

    @property
    def https(self) -> tuple[str, ...]:
        """The `https:` URIs, to POST reports to (RPT-20)."""
        return tuple(uri for uri in self.rua if _scheme(uri) == "https")


def _scheme(uri: str) -> str:
    return uri.partition(":")[0].lower()  # schemes are case-insensitive (RFC 3986 §3.1)


def mailto_addresses(uri: str) -> tuple[str, ...]:
    """The addresses of a `mailto:` URI: before any `?`, split at `,`, percent-decoded (RFC 6068 §2)."""
    if _scheme(uri) != "mailto":
        raise TlsRptRecordError(f"not a mailto: URI: {uri!r}")
    to = uri.partition(":")[2].partition("?")[0]
    try:
        return tuple(unquote(part, errors="strict").strip() for part in to.split(","))
    except UnicodeDecodeError as exc:
        raise TlsRptRecordError(f"mailto: URI is not UTF-8: {uri!r}") from exc


def _usable(uri: str) -> bool:
    """Only mailto: with addresses and https: with a host are kept (RPT-7)."""
    scheme = _scheme(uri)
    if scheme == "mailto":
        try:
            addresses = mailto_addresses(uri)
        except TlsRptRecordError:
            return False
        for address in addresses:
            local, at, domain = address.rpartition("@")
            if not (at and local and domain) or any(c.isspace() or ord(c) < 0x20 for c in address):
                return False
        return True
    if scheme == "https":
        try:
            parts = urlsplit(uri)
            parts.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError:  # bad port, bad IPv6 literal
            return False
        return bool(parts.hostname)
    return False


def parse_tlsrpt_record(text: str) -> TlsRptRecord:
    """Parse one record already known to start with v=TLSRPTv1 (RPT-5, RPT-6, RPT-7)."""
    fields = _FIELD_DELIM.split(text.strip(" \t"))
    if fields[0] != "v=TLSRPTv1":
        raise TlsRptRecordError(f"not a TLSRPT record: {text!r}")
    rua: str | None = None
    for field in fields[1:]:
        if not field:
            continue  # a trailing ";" (allowed) or an empty field (tolerated)
        name, eq, value = field.partition("=")
        if not eq or not _EXT_NAME.fullmatch(name):
            raise TlsRptRecordError(f"malformed field {field!r} in TLSRPT record")
        if name == "rua" and rua is None:
            rua = value
        # any other field is an extension and is ignored (RPT-6)
    if rua is None:
        raise TlsRptRecordError("TLSRPT record has no rua= field (RPT-6)")
    kept = tuple(uri for uri in _URI_DELIM.split(rua) if uri and _usable(uri))
    if not kept:
        raise TlsRptRecordError(f"TLSRPT record has no usable mailto: or https: URI: {rua!r} (RPT-7)")
    return TlsRptRecord(kept)


def select_tlsrpt_record(texts: Sequence[str | Sequence[str]]) -> TlsRptRecord:
    """Pick and parse the one TLSRPT record among the TXT records at `_smtp._tls.<domain>`.

    Each item is one TXT record: a string, or the record's character-strings, which are joined
    without spaces (RPT-5). Raises TlsRptRecordError when there is no record, several (RPT-4), or
    the one record is unusable (RPT-6, RPT-7).
    """
    records = [t if isinstance(t, str) else "".join(t) for t in texts]
    candidates = [r for r in records if _VERSION.match(r)]
    if not candidates:
        raise TlsRptRecordError("no v=TLSRPTv1 record")
    if len(candidates) > 1:
        raise TlsRptRecordError(f"{len(candidates)} v=TLSRPTv1 records; none is used (RPT-4)")
    return parse_tlsrpt_record(candidates[0])
