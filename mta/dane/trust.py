"""Can the AD bit be trusted? (DANE-1) The checks behind `check-config`'s and `serve`'s resolver warnings.

mta never validates DNSSEC itself: with `[dns] dnssec = true` it believes the AD bit of its
nameservers. That bit travels unauthenticated, so only a validating resolver on this host
(loopback) is safe; every other nameserver - configured, or the system's from resolv.conf - is
named in a warning.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from pathlib import Path

from mta.config import Config


def system_nameservers(path: str = "/etc/resolv.conf") -> list[str]:
    """The `nameserver` lines of resolv.conf (what dnspython's system resolver would use)."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return []
    return [parts[1] for parts in (line.split() for line in text.splitlines())
            if len(parts) >= 2 and parts[0] == "nameserver"]


def dnssec_warnings(cfg: Config, system: Sequence[str]) -> list[str]:
    """One warning per non-loopback nameserver whose AD bit `cfg` trusts (pure: `system` given)."""
    if not cfg.dns.dnssec:
        return []
    servers = cfg.dns.nameservers or tuple(system)
    where = "dns.nameservers" if cfg.dns.nameservers else "/etc/resolv.conf"
    if not servers:
        return [f"dns.dnssec: no nameserver in {where}: every lookup will fail"]
    out = []
    for ns in servers:
        try:
            loopback = ipaddress.ip_address(ns.split("%")[0]).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            out.append(f"dns.dnssec: nameserver {ns} ({where}) is not on loopback: its AD bit can be forged "
                       "on the way; run a validating resolver on this host (see README)")
    return out


def resolver_warnings(cfg: Config) -> list[str]:
    """`dnssec_warnings` with the system resolver read from /etc/resolv.conf when none is configured."""
    if not cfg.dns.dnssec:
        return []
    return dnssec_warnings(cfg, () if cfg.dns.nameservers else system_nameservers())
