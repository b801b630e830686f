"""mta.net.dns against the fake DNS server on loopback, and the fake server itself (O-DNS).

Checklist: SMTP-1/2/3/4/6/7/11/13, NMX-1/2/3/4, STS-5/20/21/24/38, ID-7.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import aiohttp
import aiohttp.web
import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from mta.errors import DnsPermanentError, DnsTemporaryError
from mta.net.dns import MAX_NEGATIVE_TTL, MAX_POSITIVE_TTL, AiohttpResolver, MxAnswer, Resolver, to_ascii
from tests.support.fake_dns import FakeDns, Zone

TIMEOUT = 0.5


@pytest.fixture
def server() -> Iterator[FakeDns]:
    with FakeDns(Zone(), host="127.0.0.53") as running:
        yield running


@pytest.fixture
def zone(server: FakeDns) -> Zone:
    return server.zone


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def resolver(server: FakeDns, **kwargs: object) -> Resolver:
    return Resolver([server.host], port=server.port, timeout=TIMEOUT, **kwargs)  # type: ignore[arg-type]


def ask(server: FakeDns, name: str, rdtype: str, tcp: bool = False, timeout: float = 2.0) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype)
    send = dns.query.tcp if tcp else dns.query.udp
    return send(query, server.host, port=server.port, timeout=timeout)


# -- the fake server itself (O-DNS) ------------------------------------------------------------

def test_o_dns_answers_over_udp_and_tcp_and_logs_each_query(server: FakeDns, zone: Zone) -> None:
    zone.add("mx1.example.test", "A", "127.0.0.5")
    for tcp in (False, True):
        reply = ask(server, "MX1.example.test", "A", tcp=tcp)
        assert reply.rcode() == dns.rcode.NOERROR and reply.flags & dns.flags.AA
        assert [rd.address for rd in reply.answer[0]] == ["127.0.0.5"]
    assert [tuple(q) for q in server.query_log] == [("mx1.example.test", "A", "udp"), ("mx1.example.test", "A", "tcp")]
    assert server.count("mx1.example.test", "A") == 2
    server.clear_log()
    assert server.queries == []


def test_o_dns_nxdomain_and_nodata_carry_soa(server: FakeDns, zone: Zone) -> None:
    zone.add("example.test", "MX", "10 mx1.example.test.")
    zone.add("a.b.example.test", "A", "127.0.0.5")
    missing = ask(server, "nope.example.test", "MX")
    assert missing.rcode() == dns.rcode.NXDOMAIN and not missing.answer
    assert missing.authority[0].rdtype == dns.rdatatype.SOA
    for name in ("example.test", "b.example.test"):  # NODATA, incl. an empty non-terminal
        nodata = ask(server, name, "TXT")
        assert nodata.rcode() == dns.rcode.NOERROR and not nodata.answer
        assert nodata.authority[0].rdtype == dns.rdatatype.SOA
    zone.remove("example.test", "MX")
    assert ask(server, "example.test", "MX").rcode() == dns.rcode.NOERROR  # a.b.example.test is below it
    zone.remove("a.b.example.test")
    assert ask(server, "example.test", "MX").rcode() == dns.rcode.NXDOMAIN


def test_o_dns_multi_string_txt_and_cname_chasing(server: FakeDns, zone: Zone) -> None:
    zone.add("_mta-sts.example.test", "CNAME", "_mta-sts.provider.test.")
    zone.add("_mta-sts.provider.test", "TXT", '"v=STSv1; i" "d=abc"')
    reply = ask(server, "_mta-sts.example.test", "TXT")
    assert [rrset.rdtype for rrset in reply.answer] == [dns.rdatatype.CNAME, dns.rdatatype.TXT]
    assert reply.answer[1][0].strings == (b"v=STSv1; i", b"d=abc")


def test_o_dns_rcode_drop_and_truncation(server: FakeDns, zone: Zone) -> None:
    zone.add("bad.example.test", "A", "127.0.0.5")
    zone.set_rcode("bad.example.test", "SERVFAIL")
    assert ask(server, "bad.example.test", "A").rcode() == dns.rcode.SERVFAIL
    zone.set_rcode("bad.example.test", None)
    assert ask(server, "bad.example.test", "A").rcode() == dns.rcode.NOERROR
    zone.set_drop("bad.example.test")
    with pytest.raises(dns.exception.Timeout):
        ask(server, "bad.example.test", "A", timeout=0.3)
    zone.set_huge("example.test")
    zone.add("example.test", "A", "127.0.0.6")
    udp = ask(server, "example.test", "A")
    assert udp.flags & dns.flags.TC and not udp.answer
    assert ask(server, "example.test", "A", tcp=True).answer[0][0].address == "127.0.0.6"
    for i in range(40):  # genuinely larger than 512 octets: truncated without any flag
        zone.add("many.example.test", "TXT", f'"record number {i} padded with some text"')
    assert ask(server, "many.example.test", "TXT").flags & dns.flags.TC
    assert len(ask(server, "many.example.test", "TXT", tcp=True).answer[0]) == 40


# -- MX (SMTP-1..6, NMX-1..4) ------------------------------------------------------------------

async def test_smtp_9_mx_records_normalised_and_sorted(server: FakeDns, zone: Zone) -> None:
    zone.add("example.test", "MX", "20 MX2.Example.Test.")
    zone.add("example.test", "MX", "10 mx1.example.test.")
    assert await resolver(server).mx("Example.Test.") == MxAnswer(
        "mx", ((10, "mx1.example.test"), (20, "mx2.example.test")))
    assert server.queries == [("example.test", "MX")]


@pytest.mark.req("NMX-2")
@pytest.mark.parametrize("records", [["0 ."], ["10 ."], ["0 .", "20 ."]])
async def test_nmx_1_nmx_4_root_exchange_alone_is_null_mx(server: FakeDns, zone: Zone, records: list[str]) -> None:
    for value in records:
        zone.add("null.example.test", "MX", value)
    zone.add("null.example.test", "A", "127.0.0.5")  # NMX-2: no implicit-MX fallback to this
    answer = await resolver(server).mx("null.example.test")
    assert answer.kind == "null"
    assert all(host == "." for _, host in answer.records)


async def test_nmx_3_root_exchange_mixed_with_real_ones_is_ignored(server: FakeDns, zone: Zone) -> None:
    zone.add("example.test", "MX", "0 .")
    zone.add("example.test", "MX", "10 mx1.example.test.")
    assert await resolver(server).mx("example.test") == MxAnswer("mx", ((10, "mx1.example.test"),))


@pytest.mark.parametrize("rdtype,value", [("A", "127.0.0.5"), ("AAAA", "::1")])
async def test_smtp_4_nodata_with_address_is_implicit_mx(server: FakeDns, zone: Zone, rdtype: str,
                                                         value: str) -> None:
    zone.add("example.test", rdtype, value)
    assert await resolver(server).mx("example.test") == MxAnswer("implicit", ((0, "example.test"),))


async def test_smtp_6_nodata_without_address_is_permanent(server: FakeDns, zone: Zone) -> None:
    zone.add("example.test", "TXT", '"v=spf1 -all"')
    with pytest.raises(DnsPermanentError, match="no MX and no address"):
        await resolver(server).mx("example.test")


async def test_smtp_6_implicit_mx_address_lookup_failing_is_temporary(server: FakeDns, zone: Zone) -> None:
    zone.add("example.test", "TXT", '"v=spf1 -all"')
    zone.set_rcode("example.test", "SERVFAIL", rdtype="A")
    zone.set_rcode("example.test", "SERVFAIL", rdtype="AAAA")
    with pytest.raises(DnsTemporaryError):
        await resolver(server).mx("example.test")


async def test_smtp_2_nxdomain_is_permanent(server: FakeDns) -> None:
    with pytest.raises(DnsPermanentError, match="does not exist"):
        await resolver(server).mx("nope.example.test")


async def test_smtp_3_servfail_is_temporary(server: FakeDns, zone: Zone) -> None:
    zone.add("example.test", "MX", "10 mx1.example.test.")
    zone.set_rcode("example.test", "SERVFAIL")
    with pytest.raises(DnsTemporaryError, match="SERVFAIL"):
        await resolver(server).mx("example.test")


async def test_smtp_3_timeout_is_temporary_and_bounded(server: FakeDns, zone: Zone) -> None:
    zone.add("example.test", "MX", "10 mx1.example.test.")
    zone.set_drop("example.test")
    started = time.monotonic()
    with pytest.raises(DnsTemporaryError, match="no answer within"):
        await resolver(server).mx("example.test")
    assert time.monotonic() - started < TIMEOUT + 1.0
    assert server.count("example.test", "MX") >= 2  # attempts=2: the lifetime is split between tries


async def test_smtp_3_no_nameserver_listening_is_temporary() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.54", 0))
        port = sock.getsockname()[1]
    with pytest.raises(DnsTemporaryError):
        await Resolver(["127.0.0.54"], port=port, timeout=TIMEOUT).mx("example.test")


async def test_smtp_1_cname_at_domain_is_followed(server: FakeDns, zone: Zone) -> None:
    zone.add("alias.example.test", "CNAME", "alias2.example.test.")
    zone.add("alias2.example.test", "CNAME", "real.example.test.")
    zone.add("real.example.test", "MX", "10 mx.real.example.test.")
    assert await resolver(server).mx("alias.example.test") == MxAnswer("mx", ((10, "mx.real.example.test"),))


async def test_smtp_2_cname_to_nowhere_is_permanent(server: FakeDns, zone: Zone) -> None:
    zone.add("alias.example.test", "CNAME", "gone.example.test.")
    with pytest.raises(DnsPermanentError):
        await resolver(server).mx("alias.example.test")


async def test_smtp_7_id_7_mx_target_cname_keeps_rdata_name(server: FakeDns, zone: Zone) -> None:
    zone.add("example.test", "MX", "10 mx.example.test.")
    zone.add("mx.example.test", "CNAME", "host.provider.test.")
    zone.add("host.provider.test", "A", "127.0.0.9")
    r = resolver(server)
    assert (await r.mx("example.test")).records == ((10, "mx.example.test"),)
    assert await r.addresses("mx.example.test", ipv6=False) == ["127.0.0.9"]


# -- addresses (SMTP-11, SMTP-13) ---------------------------------------------------------------

async def test_smtp_11_smtp_13_aaaa_first_then_a_in_resolver_order(server: FakeDns, zone: Zone) -> None:
    for value in ("127.0.0.7", "127.0.0.5"):
        zone.add("mx.example.test", "A", value)
    zone.add("mx.example.test", "AAAA", "::1")
    r = resolver(server)
    assert await r.addresses("mx.example.test") == ["::1", "127.0.0.7", "127.0.0.5"]
    server.clear_log()
    assert await r.addresses("mx.example.test", ipv6=False) == ["127.0.0.7", "127.0.0.5"]
    assert server.queries == [("mx.example.test", "A")]  # IPv4-only: AAAA never asked


async def test_smtp_6_address_negatives_are_empty(server: FakeDns, zone: Zone) -> None:
    zone.add("mx.example.test", "TXT", '"no addresses here"')
    r = resolver(server)
    assert await r.addresses("mx.example.test") == []
    assert await r.addresses("gone.example.test") == []


async def test_smtp_6_address_failure_is_temporary_unless_other_family_answers(server: FakeDns, zone: Zone) -> None:
    zone.add("mx.example.test", "A", "127.0.0.5")
    zone.set_rcode("mx.example.test", "SERVFAIL", rdtype="AAAA")
    r = resolver(server)
    assert await r.addresses("mx.example.test") == ["127.0.0.5"]
    zone.set_rcode("mx.example.test", "SERVFAIL")
    with pytest.raises(DnsTemporaryError):
        await r.addresses("mx.example.test")


async def test_smtp_13_ip_address_host_needs_no_lookup(server: FakeDns) -> None:
    r = resolver(server)
    assert await r.addresses("127.0.0.8") == ["127.0.0.8"]
    assert await r.addresses("::1") == ["::1"]
    assert await r.addresses("::1", ipv6=False) == []
    assert server.queries == []


# -- TXT (STS-20, STS-21, STS-24) and IDN (STS-5) ----------------------------------------------

async def test_sts_20_txt_strings_joined_without_separator(server: FakeDns, zone: Zone) -> None:
    zone.add("_mta-sts.example.test", "TXT", '"v=STSv1; i" "d=abc"')
    zone.add("_mta-sts.example.test", "TXT", '"v=spf1 -all"')
    assert sorted(await resolver(server).txt("_mta-sts.example.test")) == ["v=STSv1; id=abc", "v=spf1 -all"]


async def test_sts_20_txt_bad_utf8_is_replaced_not_fatal(server: FakeDns, zone: Zone) -> None:
    zone.add("_mta-sts.example.test", "TXT", '"v=STSv1; id=\\255"')
    assert await resolver(server).txt("_mta-sts.example.test") == ["v=STSv1; id=\ufffd"]


async def test_sts_21_txt_cname_chain_followed(server: FakeDns, zone: Zone) -> None:
    zone.add("_mta-sts.example.test", "CNAME", "_mta-sts.hop.test.")
    zone.add("_mta-sts.hop.test", "CNAME", "_mta-sts.provider.test.")
    zone.add("_mta-sts.provider.test", "TXT", '"v=STSv1; id=prov1"')
    assert await resolver(server).txt("_mta-sts.example.test") == ["v=STSv1; id=prov1"]


async def test_sts_9_txt_negatives_are_empty(server: FakeDns, zone: Zone) -> None:
    zone.add("example.test", "MX", "10 mx.example.test.")
    r = resolver(server)
    assert await r.txt("_mta-sts.example.test") == []  # NXDOMAIN
    assert await r.txt("example.test") == []  # NODATA


async def test_sts_24_txt_servfail_and_timeout_are_temporary(server: FakeDns, zone: Zone) -> None:
    zone.add("_mta-sts.example.test", "TXT", '"v=STSv1; id=1"')
    zone.set_rcode("_mta-sts.example.test", "SERVFAIL")
    r = resolver(server)
    with pytest.raises(DnsTemporaryError):
        await r.txt("_mta-sts.example.test")
    zone.set_rcode("_mta-sts.example.test", None)
    zone.set_drop("_mta-sts.example.test")
    with pytest.raises(DnsTemporaryError):
        await r.txt("_mta-sts.example.test")


async def test_o_dns_huge_txt_falls_back_to_tcp(server: FakeDns, zone: Zone) -> None:
    zone.set_huge("_mta-sts.example.test")
    for i in range(30):
        zone.add("_mta-sts.example.test", "TXT", f'"v=spf1 include:spf{i}.example.test -all"')
    assert len(await resolver(server).txt("_mta-sts.example.test")) == 30
    assert [q.transport for q in server.query_log] == ["udp", "tcp"]


async def test_sts_5_u_labels_are_queried_as_a_labels(server: FakeDns, zone: Zone) -> None:
    zone.add("_mta-sts.xn--bcher-kva.example", "TXT", '"v=STSv1; id=idn1"')
    zone.add("xn--bcher-kva.example", "MX", "10 mx.xn--bcher-kva.example.")
    r = resolver(server)
    assert await r.txt("_mta-sts.Bücher.example") == ["v=STSv1; id=idn1"]
    assert (await r.mx("bücher.example")).records == ((10, "mx.xn--bcher-kva.example"),)
    assert server.queries == [("_mta-sts.xn--bcher-kva.example", "TXT"), ("xn--bcher-kva.example", "MX")]


@pytest.mark.parametrize(("text", "ascii_form"), [
    ("bücher.example", "xn--bcher-kva.example"),
    ("BÜCHER.Example.", "xn--bcher-kva.example"),
    ("xn--bcher-kva.example", "xn--bcher-kva.example"),
    ("Mail.Example.COM", "mail.example.com"),
    ("_mta-sts.bücher.example", "_mta-sts.xn--bcher-kva.example"),
])
def test_sts_5_to_ascii(text: str, ascii_form: str) -> None:
    assert to_ascii(text) == ascii_form


@pytest.mark.parametrize("text", ["", ".", "a..example", "x" * 64 + ".example"])
def test_sts_5_to_ascii_rejects_impossible_names(text: str) -> None:
    with pytest.raises(DnsPermanentError):
        to_ascii(text)


# -- cache -------------------------------------------------------------------------------------

async def test_o_dns_cache_honours_ttl_with_upper_bound(server: FakeDns, zone: Zone) -> None:
    clock = FakeClock()
    r = resolver(server, clock=clock)
    zone.add("short.example.test", "MX", "10 mx.example.test.", ttl=60)
    zone.add("long.example.test", "TXT", '"x"', ttl=86400)
    for _ in range(3):
        await r.mx("short.example.test")
        await r.txt("long.example.test")
    assert server.count("short.example.test") == 1 and server.count("long.example.test") == 1
    clock.now += 61
    await r.mx("short.example.test")
    await r.txt("long.example.test")
    assert server.count("short.example.test") == 2 and server.count("long.example.test") == 1
    clock.now += MAX_POSITIVE_TTL  # beyond the cap although the TTL says a day
    await r.txt("long.example.test")
    assert server.count("long.example.test") == 2
    r.clear_cache()
    await r.txt("long.example.test")
    assert server.count("long.example.test") == 3


async def test_o_dns_cache_ttl_zero_and_failures_never_cached(server: FakeDns, zone: Zone) -> None:
    r = resolver(server, clock=FakeClock())
    zone.add("example.test", "TXT", '"x"')  # TTL 0
    await r.txt("example.test")
    await r.txt("example.test")
    assert server.count("example.test", "TXT") == 2
    zone.set_rcode("bad.example.test", "SERVFAIL")
    for _ in range(2):
        with pytest.raises(DnsTemporaryError):
            await r.txt("bad.example.test")
    assert server.count("bad.example.test", "TXT") == 2
    zone.set_rcode("bad.example.test", None)
    zone.add("bad.example.test", "TXT", '"now there"')
    assert await r.txt("bad.example.test") == ["now there"]


async def test_o_dns_negative_answers_cached_only_briefly() -> None:
    with FakeDns(Zone(negative_ttl=3600)) as server:
        clock = FakeClock()
        r = resolver(server, clock=clock)
        assert await r.txt("_mta-sts.example.test") == []
        server.zone.add("_mta-sts.example.test", "TXT", '"v=STSv1; id=new"')
        assert await r.txt("_mta-sts.example.test") == []  # within the negative window
        assert server.count("_mta-sts.example.test") == 1
        clock.now += MAX_NEGATIVE_TTL + 0.1
        assert await r.txt("_mta-sts.example.test") == ["v=STSv1; id=new"]


# -- aiohttp adapter (STS-38) ------------------------------------------------------------------

async def test_sts_38_aiohttp_resolver_uses_our_dns(server: FakeDns, zone: Zone) -> None:
    zone.add("mta-sts.example.test", "A", "127.0.0.9")
    zone.add("mta-sts.example.test", "AAAA", "::1")
    adapter = AiohttpResolver(resolver(server))
    v4 = await adapter.resolve("mta-sts.example.test.", 8443, socket.AF_INET)
    assert v4 == [{"hostname": "mta-sts.example.test.", "host": "127.0.0.9", "port": 8443, "family": socket.AF_INET,
                   "proto": 0, "flags": socket.AI_NUMERICHOST | socket.AI_NUMERICSERV}]
    both = await adapter.resolve("mta-sts.example.test", 443, socket.AF_UNSPEC)
    assert [(e["host"], e["family"]) for e in both] == [("::1", socket.AF_INET6), ("127.0.0.9", socket.AF_INET)]
    for name in ("gone.example.test", "mta-sts.example.test"):
        zone.set_rcode("mta-sts.example.test", "SERVFAIL")
        with pytest.raises(OSError, match="cannot resolve"):
            await adapter.resolve(name, 443, socket.AF_INET)
    await adapter.close()


async def test_sts_38_aiohttp_client_connects_where_our_dns_says(server: FakeDns, zone: Zone) -> None:
    async def hello(request: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.Response(text=f"hello {request.host}")

    app = aiohttp.web.Application()
    app.router.add_get("/", hello)
    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.9", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        zone.add("policy.example.test", "A", "127.0.0.9")
        connector = aiohttp.TCPConnector(resolver=AiohttpResolver(resolver(server)), use_dns_cache=False)
        async with aiohttp.ClientSession(connector=connector, trust_env=False) as session, \
                session.get(f"http://policy.example.test:{port}/") as response:
            assert await response.text() == f"hello policy.example.test:{port}"
        assert ("policy.example.test", "A") in server.queries
    finally:
        await runner.cleanup()
