"""DNS lookups for delivery and MTA-STS: dnspython's async stub resolver behind typed results.

Rule: this is the only module that talks DNS and the only place dnspython exceptions are seen.
Each lookup ends in one of three ways: an answer, an authoritative negative (NXDOMAIN, or NODATA:
the name exists without records of the type), or `DnsTemporaryError` (SERVFAIL, REFUSED, timeout,
no nameserver). What a negative *means* is decided per record type here (MX: SMTP-2/4/6; A/AAAA
and TXT: "nothing there") and nothing else is decided: ordering MX hosts is `mta.delivery.route`.

- Nameservers: an empty list means the system resolver (/etc/resolv.conf); otherwise exactly the
  configured servers and port, never the system ones (tests point us at a fake DNS on loopback).
- DNSSEC (`dnssec=True`, DANE-1): queries carry the DO bit and every answer says whether it is
  `secure`: the AD bit of a resolver the operator declared trustworthy (`[dns] dnssec`). We never
  validate ourselves; without `dnssec` nothing is ever secure. A validating resolver answers a
  bogus RRset with SERVFAIL, which is a `DnsTemporaryError` like any other.
- Every lookup is bounded by `timeout` seconds in total (dnspython's `lifetime`); each try gets
  `timeout / attempts`. Truncated UDP answers are retried over TCP by dnspython.
- Names are converted to A-labels (mta.idn: IDNA 2008 with UTS 46 mapping) before any query (STS-5).
- A small positive cache honours the answer TTL up to MAX_POSITIVE_TTL; authoritative negatives are
  kept at most MAX_NEGATIVE_TTL; temporary failures are never cached.
- Answers a remote zone controls are bounded in what they can make an attempt do: at most
  MAX_ADDRESSES addresses per family and host are returned (cf. Postfix's smtp_mx_address_limit).
  Every MX record is returned (a DNS message bounds their number): the MX host cap
  (`route.MAX_MX_HOSTS`, cf. Exim's hosts_max_try) is applied after the MTA-STS filter, so a
  policy-listed MX below many others is still tried (issue 10 item 4). CNAME loops and
  over-long chains are temporary failures.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import aiohttp.abc
import dns.asyncresolver
import dns.exception
import dns.flags
import dns.name
import dns.rdatatype
import dns.resolver

from mta import idn
from mta.dane.records import TlsaAnswer, TlsaRecord
from mta.errors import DnsError, DnsPermanentError, DnsTemporaryError
from mta.model import IMPLICIT, MX, NULL, MxAnswer, parse_ip

__all__ = ["Addresses", "AiohttpResolver", "MxAnswer", "Resolver", "TlsaAnswer", "to_ascii"]

MAX_POSITIVE_TTL = 300.0  # seconds; a long TTL must not pin a stale MX or TXT for hours
MAX_NEGATIVE_TTL = 5.0  # seconds; a newly published record is seen almost at once
MAX_CACHE_ENTRIES = 4096
MAX_ADDRESSES = 8  # addresses per family (A, AAAA) one host yields

_OK, _NXDOMAIN, _NODATA = "ok", "nxdomain", "nodata"


def to_ascii(domain: str) -> str:
    """`domain` as lower-case A-labels without the trailing dot (STS-5, RFC 5890).

    Raises DnsPermanentError for a name DNS cannot carry (empty label, label over 63 octets,
    invalid U-label): no lookup of it can ever succeed.
    """
    try:
        return idn.to_ascii(domain)  # the one IDNA rule (IDNA 2008 + UTS #46, the `idna` package)
    except ValueError as exc:
        raise DnsPermanentError(f"invalid domain name {domain!r}: {exc}") from None


@dataclass(frozen=True)
class _Lookup:
    """One (name, type) lookup that did not fail: status and the records of the final owner."""

    status: str  # _OK | _NXDOMAIN | _NODATA
    rdatas: tuple[object, ...] = ()
    owner: str = ""  # the name the records belong to after following CNAMEs ("" if unknown)
    secure: bool = False  # AD bit from a trusted validating resolver (only with dnssec)


@dataclass(frozen=True)
class Addresses:
    """The addresses of one host, whether every answer that gave them was DNSSEC-secure, and the
    CNAME-expanded name when the host is an alias (RFC 7672 §2.2.2: TLSA base domain candidates)."""

    addresses: list[str]
    secure: bool = False
    canonical: str = ""


@dataclass(frozen=True)
class _Entry:
    expires: float
    value: _Lookup


class Resolver:
    """Typed MX/A/AAAA/TXT lookups through dnspython's async resolver (see the module rule)."""

    def __init__(self, nameservers: Sequence[str] = (), port: int = 53, timeout: float = 5.0, attempts: int = 2,
                 clock: Callable[[], float] = time.monotonic, dnssec: bool = False) -> None:
        self.timeout = timeout
        self.dnssec = dnssec
        self._clock = clock
        self._cache: dict[tuple[str, str], _Entry] = {}
        if nameservers:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = list(nameservers)
            resolver.port = port
        else:
            try:
                resolver = dns.asyncresolver.Resolver(configure=True)
            except dns.exception.DNSException:
                # No usable /etc/resolv.conf: every lookup then fails temporarily ("no nameservers"),
                # which defers mail instead of crashing the relay at start.
                resolver = dns.asyncresolver.Resolver(configure=False)
                resolver.nameservers = []
        resolver.lifetime = timeout
        resolver.timeout = timeout / max(1, attempts)
        # Ours below: dnspython's Cache/LRUCache keep an answer for its whole TTL (no upper bound, a
        # day-long TTL would pin an MX or an `_mta-sts` id) and read the wall clock, not an
        # injectable one (tests/integration/test_library_gaps.py).
        resolver.cache = None
        if dnssec:
            # DO asks the validating resolver for DNSSEC processing; AD in the query (RFC 6840 §5.7)
            # asks it to tell us the result in the AD bit of the reply.
            resolver.use_edns(0, dns.flags.DO, 1232)
            resolver.flags = dns.flags.RD | dns.flags.AD
        self._resolver = resolver

    @property
    def nameservers(self) -> list[str]:
        return [str(ns) for ns in self._resolver.nameservers]

    def clear_cache(self) -> None:
        """Forget every cached answer (positive and negative)."""
        self._cache.clear()

    async def mx(self, domain: str) -> MxAnswer:
        """The MX answer for `domain` (RFC 5321 §5.1, RFC 7505).

        - NXDOMAIN -> DnsPermanentError (SMTP-2).
        - Only root (".") exchanges, whatever the preference -> kind "null" (NMX-1, NMX-4).
        - Root exchange mixed with real ones -> the root record is ignored (NMX-3 decision).
        - NODATA -> kind "implicit", ((0, domain),) when the domain has an A or AAAA record
          (SMTP-4); otherwise DnsPermanentError "no MX and no address" (SMTP-6).
        - A CNAME at the domain is followed by dnspython (SMTP-1); the records are the target's.
        - Every real exchange is returned; the host cap comes after the policy filter (route.cap_hosts).
        """
        name = to_ascii(domain)
        found = await self._lookup(name, "MX")
        if found.status == _NXDOMAIN:
            raise DnsPermanentError(f"{name}: domain does not exist (NXDOMAIN)")
        if found.status == _NODATA:
            implicit = await self.address_answer(name, ipv6=True)
            if implicit.addresses:
                # DANE-1: with an implicit MX the address records stand in for the MX RRset.
                return MxAnswer(IMPLICIT, ((0, name),), secure=found.secure and implicit.secure)
            raise DnsPermanentError(f"{name}: no MX and no address")
        records = sorted((int(rd.preference), _host(rd.exchange)) for rd in found.rdatas)  # type: ignore[attr-defined]
        real = tuple(r for r in records if r[1] != ".")
        if not real:
            return MxAnswer(NULL, tuple(records), secure=found.secure)
        return MxAnswer(MX, real, secure=found.secure)

    async def addresses(self, host: str, ipv6: bool = True) -> list[str]:
        """IP addresses of `host`: AAAA first (when `ipv6`), then A, each in the order DNS gave (SMTP-11).

        SMTP-13 decision: with `ipv6` off (an IPv4-only relay) AAAA is not even asked for; with it on,
        IPv6 addresses are tried first (RFC 6724 default preference). An authoritative negative
        (NXDOMAIN, NODATA) gives no addresses. A temporary failure of one family does not hide the
        other family's addresses; it raises DnsTemporaryError only when no address was found.
        At most MAX_ADDRESSES of each family are returned.
        A host that is already an IP address is returned as is (a configured smart host).
        """
        return (await self.address_answer(host, ipv6)).addresses

    async def address_answer(self, host: str, ipv6: bool = True) -> Addresses:
        """`addresses()` with its DNSSEC status: secure only if every family's answer was secure
        (a failed family makes the set insecure, so DANE is then not attempted, DANE-1/2)."""
        ip = parse_ip(host)
        if ip is not None:
            return Addresses([str(ip)] if ip.version == 4 or ipv6 else [])
        name = to_ascii(host)
        rdtypes = ("AAAA", "A") if ipv6 else ("A",)
        # From the cache when it holds every family: the common case costs no tasks (issue 18).
        results: list[_Lookup | BaseException] = [hit for t in rdtypes if (hit := self._recall(name, t)) is not None]
        if len(results) < len(rdtypes):
            results = await asyncio.gather(*(self._lookup(name, t) for t in rdtypes), return_exceptions=True)
        found: list[str] = []
        failure: DnsTemporaryError | None = None
        secure = True
        canonical = ""
        for result in results:
            if isinstance(result, DnsTemporaryError):
                failure = result
                secure = False
            elif isinstance(result, BaseException):
                raise result
            else:
                found.extend(str(rd.address) for rd in result.rdatas[:MAX_ADDRESSES])  # type: ignore[attr-defined]
                secure = secure and result.secure
                if result.owner and result.owner != name:
                    canonical = canonical or result.owner
        if not found and failure is not None:
            raise failure
        return Addresses(found, secure and bool(found), canonical)

    async def tlsa(self, name: str) -> TlsaAnswer:
        """The TLSA RRset at `name` (e.g. `_25._tcp.mx.example.com`), CNAMEs followed; NXDOMAIN and
        NODATA give no records. A SERVFAIL (bogus in a signed zone) raises DnsTemporaryError (DANE-3)."""
        owner = to_ascii(name)
        found = await self._lookup(owner, "TLSA")
        records = tuple(TlsaRecord(int(rd.usage), int(rd.selector), int(rd.mtype), bytes(rd.cert))  # type: ignore[attr-defined]
                        for rd in found.rdatas)
        return TlsaAnswer(owner, records, found.secure)

    async def txt(self, name: str) -> list[str]:
        """The TXT records at `name`, CNAME chains followed (STS-21), NXDOMAIN/NODATA -> [].

        Each record's character-strings are joined with no separator (STS-20) and decoded as
        UTF-8 with replacement, so a stray byte can only make a record invalid, never crash.
        """
        texts, _owner = await self.txt_with_owner(name)
        return texts

    async def txt_with_owner(self, name: str) -> tuple[list[str], str]:
        """`txt(name)` and the owner name of the records once CNAMEs are followed (SEED-S6)."""
        qname = to_ascii(name)
        found = await self._lookup(qname, "TXT")
        texts = [b"".join(rd.strings).decode("utf-8", errors="replace") for rd in found.rdatas]  # type: ignore[attr-defined]
        return texts, found.owner or qname

    def _recall(self, name: str, rdtype: str) -> _Lookup | None:
        entry = self._cache.get((name, rdtype))
        return entry.value if entry is not None and entry.expires > self._clock() else None

    async def _lookup(self, name: str, rdtype: str) -> _Lookup:
        """Ask (or recall) `name`/`rdtype`; all dnspython exceptions are mapped here."""
        key = (name, rdtype)
        hit = self._recall(name, rdtype)
        if hit is not None:
            return hit
        what = f"{name} {rdtype}"
        try:
            answer = await self._resolver.resolve(dns.name.from_text(name), rdtype, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN as exc:
            self._store(key, _Lookup(_NXDOMAIN), min(_negative_ttl(exc), MAX_NEGATIVE_TTL))
            return _Lookup(_NXDOMAIN)
        except dns.exception.Timeout as exc:
            raise DnsTemporaryError(f"{what}: no answer within {self.timeout:g}s") from exc
        except dns.resolver.NoNameservers as exc:
            raise DnsTemporaryError(f"{what}: no nameserver gave a usable answer ({_why(exc)})") from exc
        except dns.resolver.YXDOMAIN as exc:
            raise DnsPermanentError(f"{what}: name too long after DNAME substitution (YXDOMAIN)") from exc
        except dns.exception.DNSException as exc:
            # CNAME chain too long, malformed answers and the like: maybe fixed by the publisher later.
            raise DnsTemporaryError(f"{what}: {exc.__class__.__name__}: {exc}") from exc
        secure = self.dnssec and bool(answer.response.flags & dns.flags.AD)
        if answer.rrset is None:
            found = _Lookup(_NODATA, secure=secure)
            self._store(key, found, min(answer.chaining_result.minimum_ttl, MAX_NEGATIVE_TTL))
        else:
            found = _Lookup(_OK, tuple(answer.rrset), _host(answer.canonical_name), secure=secure)
            self._store(key, found, min(answer.chaining_result.minimum_ttl, MAX_POSITIVE_TTL))
        return found

    def _store(self, key: tuple[str, str], value: _Lookup, ttl: float) -> None:
        if ttl <= 0:
            return
        now = self._clock()
        if len(self._cache) >= MAX_CACHE_ENTRIES:
            self._cache = {k: e for k, e in self._cache.items() if e.expires > now}
            if len(self._cache) >= MAX_CACHE_ENTRIES:
                self._cache.clear()
        self._cache[key] = _Entry(now + ttl, value)


def _host(name: dns.name.Name) -> str:
    """An MX exchange as a lower-case host name without the final dot; the root stays "."."""
    return name.to_text(omit_final_dot=True).lower()


def _negative_ttl(exc: dns.resolver.NXDOMAIN) -> float:
    """The SOA-derived negative TTL (RFC 2308) of an NXDOMAIN answer; 0 (do not cache) if unknown."""
    try:
        responses = exc.responses()  # type: ignore[no-untyped-call]
        return float(min(r.resolve_chaining().minimum_ttl for r in responses.values()))
    except (dns.exception.DNSException, KeyError, ValueError):
        return 0.0


def _why(exc: dns.resolver.NoNameservers) -> str:
    """A short reason from dnspython's per-server error list (e.g. "127.0.0.53 answered SERVFAIL")."""
    errors = exc.kwargs.get("errors") or []
    if not errors:
        return "no nameservers configured"
    reasons = []
    for server, _tcp, _port, err, _response in errors:
        if isinstance(err, str):  # an rcode such as "SERVFAIL"
            reasons.append(f"{server} answered {err}")
        else:
            reasons.append(f"{server}: {err.__class__.__name__} {err}".rstrip())
    return "; ".join(dict.fromkeys(reasons))


class AiohttpResolver(aiohttp.abc.AbstractResolver):
    """aiohttp's resolver interface on top of our `Resolver` (STS-38).

    The MTA-STS fetcher resolves `mta-sts.<domain>` through the configured DNS servers, never the
    system's getaddrinfo. No address or a DNS failure is an OSError, which aiohttp reports as
    ClientConnectorDNSError.
    """

    def __init__(self, resolver: Resolver) -> None:
        self._resolver = resolver

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[aiohttp.abc.ResolveResult]:
        try:
            found = await self._resolver.addresses(host, ipv6=family != socket.AF_INET)
        except DnsError as exc:
            raise OSError(f"cannot resolve {host}: {exc}") from exc
        results: list[aiohttp.abc.ResolveResult] = []
        for address in found:
            fam = socket.AF_INET6 if ":" in address else socket.AF_INET
            if family not in (socket.AF_UNSPEC, fam):
                continue
            results.append(aiohttp.abc.ResolveResult(
                hostname=host, host=address, port=port, family=fam, proto=0,
                flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV))
        if not results:
            raise OSError(f"cannot resolve {host}: no address")
        return results

    async def close(self) -> None:
        return None
