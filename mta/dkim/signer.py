"""The configured signer: picks the keys for a message (select.py) and signs it (sign.py).

Blocking (CPU) work: callers on an event loop run `sign` in a worker thread, as the spool write
that follows it does (mta.submission.accept does both in one hop).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mta import metrics
from mta.config import Config
from mta.dkim import keys as keys_mod
from mta.dkim import select, sign
from mta.dkim.keys import LoadedKey

# RFC 8460 §5.3: the TLS-Report-* fields SHOULD be covered by a report's signature.
REPORT_HEADERS = ("TLS-Report-Domain", "TLS-Report-Submitter")


@dataclass(frozen=True)
class Signed:
    data: bytes
    note: str  # for the log: "example.org/sel1" per signature, or "unsigned: <why>"


def _field_text(value: bytes) -> str:
    """A raw From: value as unfolded text for address parsing (8-bit as UTF-8, RFC 6532). Encoded
    words stay encoded: decoding them first could turn a display name into extra addresses."""
    return value.decode("utf-8", "replace").replace("\r\n", "")


class Signer:
    """Signs with the configured keys: relayed mail only when [dkim] enabled, report mails always."""

    def __init__(self, keys: Sequence[LoadedKey], headers: Sequence[str], oversign: Sequence[str],
                 enabled: bool = True) -> None:
        self.keys = tuple(keys)
        self.headers = tuple(headers)
        self.oversign = tuple(oversign)
        self.enabled = enabled

    @classmethod
    def from_config(cls, cfg: Config) -> Signer:
        """Loads every key (ConfigError naming dkim.keys[i].key_file when one cannot sign)."""
        return cls(keys_mod.load_keys(cfg.dkim, cfg.source), cfg.dkim.headers, cfg.dkim.oversign, cfg.dkim.enabled)

    def sign_submission(self, message: bytes, now: float) -> Signed:
        """Sign a message accepted for relay when its From: domain has a key (select.py)."""
        if not self.enabled:
            return Signed(message, "")
        split = sign.split_message(message)
        froms = [_field_text(v) for n, v in split[0] if n.strip(b" \t").lower() == b"from"]
        choice = select.choose_keys(froms, self.keys)
        if not choice.keys:
            return Signed(message, f"unsigned: {choice.reason}")
        return self._sign(message, choice.keys, self.headers, now, split)

    def sign_report(self, message: bytes, reporting_domain: str, now: float) -> Signed:
        """Sign a TLS report mail with the key of the reporting domain (RFC 8460 §5.3, RPT-18)."""
        choice = select.keys_for_domain(reporting_domain, self.keys)
        if not choice.keys:
            return Signed(message, f"unsigned: {choice.reason}")
        return self._sign(message, choice.keys, self.headers + REPORT_HEADERS, now)

    def _sign(self, message: bytes, keys: Sequence[LoadedKey], headers: Sequence[str], now: float,
              split: tuple[list[tuple[bytes, bytes]], bytes] | None = None) -> Signed:
        data = sign.sign(message, keys, headers=headers, oversign=self.oversign, now=now, split=split)
        for key in keys:
            metrics.dkim_signed(key.algorithm)  # safe from the worker thread signing runs in
        return Signed(data, " ".join(f"{k.domain}/{k.selector}" for k in keys))
