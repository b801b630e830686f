"""TLSA records (RFC 6698 §2, RFC 7218 names) and which of them SMTP may use (RFC 7672 §3.1).

Pure data that imports nothing: defined here rather than in `mta.net.dns` so the pure DANE modules
never import the DNS adapter; the adapter imports these, as it does `MxAnswer` from `mta.model`.
"""

from __future__ import annotations

from dataclasses import dataclass

PKIX_TA, PKIX_EE, DANE_TA, DANE_EE = 0, 1, 2, 3  # certificate usages
CERT, SPKI = 0, 1  # selectors
FULL, SHA2_256, SHA2_512 = 0, 1, 2  # matching types
_DIGEST_SIZE = {SHA2_256: 32, SHA2_512: 64}


@dataclass(frozen=True)
class TlsaRecord:
    """One TLSA RR: usage, selector, matching type and the association data."""

    usage: int
    selector: int
    mtype: int
    data: bytes

    @property
    def usable(self) -> bool:
        """Whether SMTP may rely on this record (DANE-4, DANE-5).

        Only DANE-TA(2) and DANE-EE(3) (PKIX-TA/EE are not to be relied on for SMTP, RFC 7672
        §3.1.3), selectors Cert(0)/SPKI(1), matching Full(0)/SHA2-256(1)/SHA2-512(2); a digest of
        the wrong length or empty data can never match and is unusable too.
        """
        if self.usage not in (DANE_TA, DANE_EE) or self.selector not in (CERT, SPKI):
            return False
        if self.mtype == FULL:
            return len(self.data) > 0
        return _DIGEST_SIZE.get(self.mtype) == len(self.data)

    def text(self) -> str:
        """Presentation form `"3 1 1 HEX"`, as RFC 8460 §4.4 wants it in a `tlsa` policy-string."""
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex().upper()}"


@dataclass(frozen=True)
class TlsaAnswer:
    """A TLSA lookup that did not fail: the records at `name` and whether DNSSEC validated them."""

    name: str  # the owner asked for, `_25._tcp.<base>`
    records: tuple[TlsaRecord, ...]
    secure: bool
