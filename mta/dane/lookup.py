"""The DANE lookup adapter: asks the resolver for TLSA records as `mta.dane.decide` directs (DANE-1..3)."""

from __future__ import annotations

from mta.dane import decide
from mta.dane.decide import DaneVerdict
from mta.errors import DnsError
from mta.net.dns import Addresses, Resolver


async def host_verdict(resolver: Resolver, host: str, port: int, *, enabled: bool, mx_secure: bool,
                       addresses: Addresses) -> DaneVerdict:
    """DANE's verdict for one MX host whose addresses were just looked up."""
    early = decide.precheck(enabled=enabled, mx_secure=mx_secure, addresses_secure=addresses.secure)
    if early is not None:
        return early  # no TLSA query for insecure domains: they never wait for DANE
    names = decide.reference_names(host, addresses.canonical)
    for base in decide.tlsa_bases(host, addresses.canonical):
        try:
            answer = await resolver.tlsa(decide.tlsa_owner(base, port))
        except DnsError as exc:
            return decide.from_failure(base, names, str(exc))
        verdict = decide.from_answer(base, names, answer)
        if verdict is not None:
            return verdict
    return decide.none_found()
