"""MX answer -> ordered delivery candidates (RFC 5321 §5.1, RFC 7505).

Rule: pure. This module turns what DNS said (an `mta.model.MxAnswer`, produced by `mta.net.dns`) into the
list of host names to try, in order; it never looks anything up, reads no clock and takes its
randomness (`rng`) as an argument. Every "this domain cannot receive mail" verdict that follows
from the MX answer alone is raised here as a `PermanentDeliveryError` carrying the reply to
report: null MX (NMX-1, 5.1.10), mail looping back to ourselves (SMTP-12, 5.4.6) and an MX set
made only of unusable targets (SMTP-8/SMTP-6, 5.4.4).
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from mta.errors import PermanentDeliveryError
from mta.model import IMPLICIT, MX, NULL, MxAnswer, SmtpReply, parse_ip

# MxAnswer and its kinds live in mta.model (below both this module and mta.net.dns); re-exported.
__all__ = ["IMPLICIT", "MAX_MX_HOSTS", "MX", "NULL", "Candidate", "MxAnswer", "address_literal_ip", "cap_hosts",
           "is_address_literal", "order_mx"]

#: SMTP-11 [DECISION]: at most this many MX hosts the policy allows are tried per attempt (as Exim
#: and Postfix cap them), so a hostile MX set cannot make one attempt unbounded. The cap is applied
#: AFTER the MTA-STS filter (issue 10 item 4): a policy-listed MX further down is still tried.
MAX_MX_HOSTS = 10


@dataclass(frozen=True)
class Candidate:
    """One MX host to try, in the order `order_mx` returns them."""

    host: str
    preference: int


def address_literal_ip(domain: str) -> str | None:
    """The IP inside an RFC 5321 §4.1.3 address literal (`[192.0.2.1]`, `[IPv6:2001:db8::1]`), else None.

    The `IPv6:` tag is matched case-insensitively (ABNF literal strings are case-insensitive).
    General (other-tag) literals and malformed contents are not address literals we can use.
    """
    if len(domain) < 3 or domain[0] != "[" or domain[-1] != "]":
        return None
    inner = domain[1:-1]
    if "%" in inner:  # scoped IPv6 addresses have no meaning on the Internet
        return None
    try:
        if inner[:5].lower() == "ipv6:":
            return str(ipaddress.IPv6Address(inner[5:]))
        return str(ipaddress.IPv4Address(inner))
    except ValueError:
        return None


def is_address_literal(domain: str) -> bool:
    """Whether a recipient domain is an address literal: then there is no MX and no MTA-STS (STS-4)."""
    return address_literal_ip(domain) is not None


def _is_ip(host: str) -> bool:
    return parse_ip(host) is not None


def _normal(host: str) -> str:
    return host.strip().lower().rstrip(".")


def order_mx(answer: MxAnswer, own_hostname: str, rng: random.Random) -> list[Candidate]:
    """The hosts to try for `answer`, best first; raises PermanentDeliveryError when there are none.

    - NMX-1/NMX-4: a null MX answer means the domain accepts no mail: 556 5.1.10, no retry.
    - SMTP-12: if `own_hostname` is an MX target, that preference level and every higher one are
      dropped (we are a relay for the domain and must only hand mail to better MXes); nothing left
      -> 550 5.4.6 (the mail would loop back to us).
    - SMTP-8 (decision): an exchange that is an IP address is an unresolvable host name, so it is
      dropped; when nothing else remains -> 550 5.4.4 (SMTP-6: every target unusable).
    - SMTP-9/10: sorted by preference, lowest first; equal preferences in random order (`rng`).
    A host listed twice keeps its best (lowest) preference.
    """
    if answer.kind == NULL:
        raise PermanentDeliveryError(SmtpReply(556, "recipient domain has a null MX and accepts no mail (RFC 7505)",
                                               "5.1.10"))
    best: dict[str, int] = {}
    for preference, exchange in answer.records:
        host = _normal(exchange)
        if not host:  # the root: a stray null MX record among real ones is ignored (NMX-3)
            continue
        if host not in best or preference < best[host]:
            best[host] = preference
    own = _normal(own_hostname)
    if own and own in best:
        cutoff = best[own]
        best = {h: p for h, p in best.items() if p < cutoff}
        if not best:
            raise PermanentDeliveryError(SmtpReply(
                550, f"mail loops back to myself: {own} is the best MX (RFC 5321 §5.1)", "5.4.6"))
    usable = {h: p for h, p in best.items() if not _is_ip(h)}
    if not usable:
        raise PermanentDeliveryError(SmtpReply(
            550, "no usable MX host: every MX target is an IP address, not a host name", "5.4.4"))
    levels: dict[int, list[str]] = {}
    for host, preference in usable.items():
        levels.setdefault(preference, []).append(host)
    ordered: list[Candidate] = []
    for preference in sorted(levels):
        # Sort first so the outcome depends only on the rng, not on record order.
        hosts = sorted(levels[preference])
        rng.shuffle(hosts)
        ordered.extend(Candidate(host=h, preference=preference) for h in hosts)
    return ordered


class _Judged(Protocol):
    @property
    def allowed(self) -> bool: ...


J = TypeVar("J", bound=_Judged)


def cap_hosts(verdicts: Sequence[J], limit: int = MAX_MX_HOSTS) -> list[J]:
    """The verdicts one attempt acts on, in order: up to `limit` allowed hosts (SMTP-11).

    Called with the policy's verdicts (`sts.decide.filter_mx`), so hosts the policy refuses do not
    use up the cap and a policy-listed MX below many others is still tried (issue 10 item 4).
    Refused hosts ahead of the last kept allowed one are kept too (they are reported, STS-92),
    at most `limit` of them, so a hostile MX set cannot flood the TLS report either.
    """
    kept: list[J] = []
    allowed = refused = 0
    for verdict in verdicts:
        if allowed >= limit:
            break
        if verdict.allowed:
            allowed += 1
            kept.append(verdict)
        elif refused < limit:
            refused += 1
            kept.append(verdict)
    return kept
