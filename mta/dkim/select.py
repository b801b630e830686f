"""Which keys sign a message: a pure decision over the From: field(s) and the configured domains.

Rule (DKIM-5): a message is signed when its RFC 5322 From: holds exactly one address whose domain
is a configured `domain` or a subdomain of one; the most specific configured domain wins, and
every key of that domain signs (two keys = a dual RSA + Ed25519 signature, DKIM-4). `d=` is the
configured domain, which is the From: domain or its organisational parent (DMARC alignment).
Anything else goes out unsigned, and the decision says why (for the log line).
"""

from __future__ import annotations

import email.utils
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from mta import idn


class HasDomain(Protocol):
    @property
    def domain(self) -> str: ...


K = TypeVar("K", bound=HasDomain)


@dataclass(frozen=True)
class Choice(Generic[K]):
    keys: tuple[K, ...]
    reason: str  # why nothing signs ("" when keys is not empty)


def _a_label(domain: str) -> str:
    domain = domain.strip().rstrip(".").lower()
    try:
        return idn.to_ascii(domain) if not domain.isascii() else domain  # IDNA 2008, mta's one rule
    except ValueError:
        return domain


# `a@b.example` or `Name <a@b.example>` with nothing unusual: most From: fields, read without the
# full RFC 5322 parser (which costs more than the Ed25519 signature itself).
_SIMPLE_FROM = re.compile(r"\s*(?:[A-Za-z0-9 ._-]*<[A-Za-z0-9._+-]+@([A-Za-z0-9.-]+)>"
                          r"|[A-Za-z0-9._+-]+@([A-Za-z0-9.-]+))\s*")


def from_domain(from_values: Sequence[str]) -> tuple[str | None, str]:
    """The domain of the single From: address, or (None, why there is none)."""
    if not from_values:
        return None, "no From: field"
    if len(from_values) > 1:
        return None, "several From: fields"
    simple = _SIMPLE_FROM.fullmatch(from_values[0])
    if simple:
        return _a_label(simple.group(1) or simple.group(2)), ""
    addresses = [a for _name, a in email.utils.getaddresses(list(from_values)) if a]
    if not addresses:
        return None, "no address in From:"
    if len(addresses) > 1:
        return None, "several From: addresses"
    local, at, domain = addresses[0].rpartition("@")
    if not at or not local or not domain:
        return None, "From: address has no domain"
    return _a_label(domain), ""


def choose_keys(from_values: Sequence[str], keys: Sequence[K]) -> Choice[K]:
    """The keys that sign a message with these From: field values (raw, unfolded text)."""
    domain, why = from_domain(from_values)
    if domain is None:
        return Choice((), why)
    return keys_for_domain(domain, keys)


def keys_for_domain(domain: str, keys: Sequence[K]) -> Choice[K]:
    """Every key of the most specific configured domain covering `domain`."""
    domain = _a_label(domain)
    covering = [k for k in keys if domain == k.domain.lower() or domain.endswith("." + k.domain.lower())]
    if not covering:
        return Choice((), f"no key for {domain}")
    best = max(len(k.domain) for k in covering)
    return Choice(tuple(k for k in covering if len(k.domain) == best), "")
