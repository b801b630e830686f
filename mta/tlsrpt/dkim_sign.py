"""DKIM signatures for TLS report mails (RFC 8460 §5.3: reports MUST be DKIM-signed, without l=).

Signing is dkimpy's; what is ours is the choice of headers: the two TLS-Report-* fields are
covered as RFC 8460 recommends. The key is read once; the signing domain is the submitter domain.
"""

from __future__ import annotations

from pathlib import Path

import dkim

from mta import metrics
from mta.errors import ConfigError

SIGNED_HEADERS = (b"from", b"to", b"subject", b"date", b"message-id", b"mime-version", b"content-type",
                  b"tls-report-domain", b"tls-report-submitter")


class DkimSigner:
    def __init__(self, selector: str, key_file: str, domain: str) -> None:
        try:
            self.key = Path(key_file).read_bytes()
        except OSError as exc:
            raise ConfigError(f"{key_file}: cannot read DKIM key: {exc.strerror}") from None
        self.selector = selector.encode("ascii")
        self.domain = domain.encode("ascii")

    def sign(self, message: bytes) -> bytes:
        """The message with a DKIM-Signature header in front (no body length tag)."""
        try:
            header = dkim.sign(message, self.selector, self.domain, self.key, include_headers=list(SIGNED_HEADERS),
                               length=False, tlsrpt=True)
        except dkim.DKIMException as exc:
            raise ValueError(f"DKIM signing failed: {exc}") from None
        metrics.dkim_signed("rsa-sha256")
        return header + message
