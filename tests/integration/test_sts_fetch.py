"""HTTPS policy fetch (mta.sts.fetch) against a real TLS policy server and fake DNS (checklist 1C).

Each test names its checklist item. The policy host `mta-sts.<domain>` resolves through the fake
DNS to the policy server on 127.0.0.5; certificates come from the test PKI.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from mta.errors import StsFetchError, StsPolicyError
from mta.net.dns import Resolver
from mta.sts.fetch import MAX_BODY, fetch_policy
from tests.support.fake_dns import FakeDns
from tests.support.pki import TestPki
from tests.support.policy_server import JSON_PATH, TXT_PATH, PolicyServer, make_padded_policy

SERVER_IP = "127.0.0.5"
POLICY = "version: STSv1\nmode: enforce\nmx: mx1.example.test\nmx: *.example.net\nmax_age: 86400\n"


@pytest.fixture
def pki(tmp_path: Path) -> TestPki:
    return TestPki(tmp_path / "pki")


@pytest.fixture
def fake_dns() -> Iterator[FakeDns]:
    with FakeDns() as server:
        yield server


@pytest.fixture
async def server(pki: TestPki) -> AsyncIterator[PolicyServer]:
    async with PolicyServer(pki, SERVER_IP) as srv:
        yield srv


@pytest.fixture
def resolver(fake_dns: FakeDns) -> Resolver:
    return Resolver([fake_dns.host], port=fake_dns.port, timeout=1.0)


class World:
    """Publishes policy hosts (DNS A record + server behaviour) and fetches from them."""

    def __init__(self, pki: TestPki, dns_server: FakeDns, server: PolicyServer, resolver: Resolver) -> None:
        self.pki, self.dns, self.server, self.resolver = pki, dns_server, server, resolver

    def publish(self, domain: str, text: str | bytes = POLICY, **behaviour: object) -> str:
        host = self.server.policy(domain, text, **behaviour)  # type: ignore[arg-type]
        self.dns.zone.add(host, "A", SERVER_IP)
        return host

    async def fetch(self, domain: str, timeout: float = 3.0, dialect: str = "rfc8461") -> tuple[object, str]:
        return await fetch_policy(
            domain,
            https_port=self.server.port,
            resolver=self.resolver,
            ca_file=str(self.pki.ca_file),
            timeout=timeout,
            connect_timeout=min(1.0, timeout),
            dialect=dialect,
        )


@pytest.fixture
def world(pki: TestPki, fake_dns: FakeDns, server: PolicyServer, resolver: Resolver) -> World:
    return World(pki, fake_dns, server, resolver)


async def test_sts_25_url_method_path_and_host_header(world: World) -> None:
    """STS-25: one GET of /.well-known/mta-sts.txt with Host mta-sts.<domain>:<port>; policy parsed."""
    world.publish("example.test")
    policy, text = await world.fetch("example.test")
    assert text == POLICY
    assert policy.mode == "enforce" and policy.mx == ("mx1.example.test", "*.example.net")  # type: ignore[attr-defined]
    [req] = world.server.requests
    assert (req.method, req.path) == ("GET", TXT_PATH)
    assert req.host == f"mta-sts.example.test:{world.server.port}"


async def test_sts_26_sni_is_the_policy_host(world: World) -> None:
    """STS-26: the ClientHello carries SNI mta-sts.<domain>."""
    world.publish("example.test")
    await world.fetch("example.test")
    assert world.server.sni_seen == ["mta-sts.example.test"]
    assert world.server.requests[0].sni == "mta-sts.example.test"


async def test_sts_39_crlf_body_accepted_raw_text_returned(world: World) -> None:
    """STS-39 via fetch: a CRLF body is accepted and returned byte for byte as text."""
    crlf = POLICY.replace("\n", "\r\n")
    world.publish("example.test", crlf)
    policy, text = await world.fetch("example.test")
    assert text == crlf and policy.max_age == 86400  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", ["untrusted", "expired", "wrong-name", "cn-only"])
async def test_sts_27_invalid_certificate_is_webpki_invalid(world: World, kind: str) -> None:
    """STS-27: untrusted CA, expired, SAN www.<domain> only, CN-only without SAN -> sts-webpki-invalid,
    and no HTTP request is ever made over the unverified connection."""
    world.publish("example.test", cert=kind)
    with pytest.raises(StsFetchError) as caught:
        await world.fetch("example.test")
    assert caught.value.result_type == "sts-webpki-invalid"
    assert world.server.requests == []
    assert world.server.sni_seen == ["mta-sts.example.test"]  # STS-26 even when the cert is bad


@pytest.mark.parametrize("kind", ["cn-mismatch", "partial-wildcard"])
async def test_sts_28_only_dns_id_and_whole_label_wildcards(world: World, kind: str) -> None:
    """STS-28: CN=mta-sts.<domain> with SAN other.<domain> fails; SAN mta-*.<domain> fails."""
    world.publish("example.test", cert=kind)
    with pytest.raises(StsFetchError) as caught:
        await world.fetch("example.test")
    assert caught.value.result_type == "sts-webpki-invalid"


async def test_sts_28_wildcard_san_passes(world: World) -> None:
    """STS-28: SAN *.<domain> covers mta-sts.<domain> (wildcard as the whole leftmost label)."""
    world.publish("example.test", cert="wildcard")
    policy, _ = await world.fetch("example.test")
    assert policy.mode == "enforce"  # type: ignore[attr-defined]


@pytest.mark.parametrize("status", [204, 301, 302, 304, 307, 308, 404, 410, 500, 503])
async def test_sts_30_only_200_yields_a_policy(world: World, status: int) -> None:
    """STS-30: any status but 200 (even with a valid policy body) -> sts-policy-fetch-error."""
    body = b"" if status in (204, 304) else POLICY
    world.publish("example.test", body, status=status)
    with pytest.raises(StsFetchError) as caught:
        await world.fetch("example.test")
    assert caught.value.result_type == "sts-policy-fetch-error"
    assert str(status) in str(caught.value)


@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_sts_31_redirect_not_followed(world: World, status: int) -> None:
    """STS-31: a redirect to the same host (another path) is not followed: exactly one request."""
    host = world.publish("example.test", status=status, location=f"https://mta-sts.example.test:{world.server.port}/other")
    world.server.set(host, "/other", body=POLICY)
    with pytest.raises(StsFetchError) as caught:
        await world.fetch("example.test")
    assert caught.value.result_type == "sts-policy-fetch-error"
    assert [r.path for r in world.server.requests] == [TXT_PATH]


async def test_sts_31_redirect_to_other_host_not_followed(world: World) -> None:
    """STS-31: a redirect to another (valid) policy host gets no request either."""
    world.publish("elsewhere.test")
    world.publish("example.test", status=302, location=f"https://mta-sts.elsewhere.test:{world.server.port}{TXT_PATH}")
    with pytest.raises(StsFetchError):
        await world.fetch("example.test")
    assert world.server.requests_for("mta-sts.elsewhere.test") == []
    assert len(world.server.requests) == 1


async def test_sts_32_no_http_caching(world: World) -> None:
    """STS-32: cache validators and freshness headers from the server are ignored: a second fetch
    reaches the server again and sends no If-None-Match / If-Modified-Since."""
    world.publish(
        "example.test",
        headers=(
            ("ETag", '"v1"'),
            ("Last-Modified", "Mon, 01 Jan 2024 00:00:00 GMT"),
            ("Cache-Control", "max-age=31536000"),
            ("Expires", "Fri, 01 Jan 2100 00:00:00 GMT"),
        ),
    )
    await world.fetch("example.test")
    await world.fetch("example.test")
    assert len(world.server.requests) == 2
    for req in world.server.requests:
        assert req.header("If-None-Match") is None
        assert req.header("If-Modified-Since") is None


@pytest.mark.parametrize(
    "content_type", ["text/plain", "TEXT/PLAIN", "text/plain; charset=utf-8", 'Text/Plain;charset="UTF-8"']
)
async def test_sts_33_text_plain_in_any_case_with_parameters(world: World, content_type: str) -> None:
    """STS-33: text/plain in any case, with any parameters, is accepted."""
    world.publish("example.test", content_type=content_type)
    policy, _ = await world.fetch("example.test")
    assert policy.mode == "enforce"  # type: ignore[attr-defined]


@pytest.mark.parametrize("content_type", ["text/html", "application/json", "application/octet-stream", None])
async def test_sts_33_other_or_missing_media_type_is_invalid(world: World, content_type: str | None) -> None:
    """STS-33: text/html, application/json, application/octet-stream and a missing Content-Type
    [DECISION] -> sts-policy-invalid."""
    world.publish("example.test", content_type=content_type)
    with pytest.raises(StsPolicyError) as caught:
        await world.fetch("example.test")
    assert caught.value.result_type == "sts-policy-invalid"


@pytest.mark.parametrize(
    "framing",
    [
        {"framing": "length"},  # honest Content-Length over the cap
        {"framing": "chunked"},  # no length at all, chunked
        {"framing": "close"},  # no length, body until the connection closes
        {"framing": "length", "content_length": 1000},  # a lying (small) Content-Length
    ],
    ids=["content-length", "chunked", "until-close", "lying-length"],
)
async def test_sts_34_body_over_64k_fails(world: World, framing: dict[str, object]) -> None:
    """STS-34: a 65,537-byte body fails as sts-policy-fetch-error whatever the framing says."""
    world.publish("example.test", make_padded_policy(POLICY, MAX_BODY + 1), **framing)
    with pytest.raises(StsFetchError) as caught:
        await world.fetch("example.test")
    assert caught.value.result_type == "sts-policy-fetch-error"


async def test_sts_34_huge_body_is_not_buffered(world: World) -> None:
    """STS-34: a 64 MiB body without a length fails quickly: reading stops at the cap."""
    world.publish("example.test", make_padded_policy(POLICY, 64 * 1024 * 1024), framing="close")
    started = time.monotonic()
    with pytest.raises(StsFetchError, match="exceeds"):
        await world.fetch("example.test")
    assert time.monotonic() - started < 2.0


@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
async def test_sts_34_body_of_exactly_64k_is_accepted(world: World, framing: str) -> None:
    """STS-34: a body of 64 KiB or less is accepted."""
    body = make_padded_policy(POLICY, MAX_BODY)
    world.publish("example.test", body, framing=framing)
    policy, text = await world.fetch("example.test")
    assert len(text) == MAX_BODY and policy.mode == "enforce"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "behaviour",
    [{"stall": "before-headers"}, {"stall": "after-headers"}, {"drip": 0.2}],
    ids=["stall-before-headers", "stall-after-headers", "drip"],
)
async def test_sts_35_slow_server_times_out(world: World, behaviour: dict[str, object]) -> None:
    """STS-35: a server that stalls (or drips a byte at a time) fails after the total timeout."""
    world.publish("example.test", **behaviour)
    started = time.monotonic()
    with pytest.raises(StsFetchError) as caught:
        await world.fetch("example.test", timeout=1.0)
    elapsed = time.monotonic() - started
    assert caught.value.result_type == "sts-policy-fetch-error"
    assert 0.9 <= elapsed < 2.5


async def test_sts_38_policy_host_resolved_by_configured_dns(world: World) -> None:
    """STS-38: mta-sts.<domain> is resolved through the configured DNS server (O-DNS shows it)."""
    world.publish("example.test")
    await world.fetch("example.test")
    assert world.dns.count("mta-sts.example.test", "A") >= 1


async def test_sts_38_ambient_proxy_and_cookies_ignored(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """STS-38: HTTPS_PROXY/ALL_PROXY from the environment are not used; cookies are not sent back."""
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.9:9")  # nothing listens there
    world.publish("example.test", headers=(("Set-Cookie", "session=abc; Path=/"),))
    await world.fetch("example.test")
    await world.fetch("example.test")
    assert len(world.server.requests) == 2
    assert all(req.header("Cookie") is None for req in world.server.requests)


async def test_sts_92_policy_host_without_address_is_fetch_error(world: World) -> None:
    """STS-92: no A/AAAA record for mta-sts.<domain> -> sts-policy-fetch-error, no request."""
    world.server.policy("example.test", POLICY)  # served, but not in DNS
    with pytest.raises(StsFetchError) as caught:
        await world.fetch("example.test")
    assert caught.value.result_type == "sts-policy-fetch-error"
    assert world.server.requests == []


async def test_sts_92_connection_refused_is_fetch_error(world: World) -> None:
    """STS-92: policy host unreachable (nothing listens on its address) -> sts-policy-fetch-error."""
    world.dns.zone.add("mta-sts.example.test", "A", "127.0.0.6")
    with pytest.raises(StsFetchError) as caught:
        await world.fetch("example.test")
    assert caught.value.result_type == "sts-policy-fetch-error"


async def test_sts_54_invalid_body_is_policy_invalid(world: World) -> None:
    """STS-54/92: a 200 text/plain body that is not a policy -> sts-policy-invalid."""
    world.publish("example.test", "<html>hello</html>\n")
    with pytest.raises(StsPolicyError) as caught:
        await world.fetch("example.test")
    assert caught.value.result_type == "sts-policy-invalid"


async def test_sts_5_idn_domain_uses_a_label_host(world: World) -> None:
    """STS-5: a U-label domain is fetched from mta-sts.<A-label> (DNS, SNI and Host header)."""
    world.publish("xn--bcher-kva.example")
    policy, _ = await world.fetch("bücher.example")
    assert policy.mode == "enforce"  # type: ignore[attr-defined]
    assert world.server.sni_seen == ["mta-sts.xn--bcher-kva.example"]
    assert world.server.requests[0].host == f"mta-sts.xn--bcher-kva.example:{world.server.port}"


async def test_seed_s3_draft03_json_policy(world: World) -> None:
    """SEED-S2/S3: the draft03 dialect fetches /.well-known/mta-sts.json (application/json allowed)."""
    host = "mta-sts.example.test"
    world.dns.zone.add(host, "A", SERVER_IP)
    doc = '{"version": "STSv1", "mode": "report", "mx": ["mx1.example.test"], "max_age": "3600"}'
    world.server.set(host, JSON_PATH, body=doc, content_type="application/json")
    policy, text = await world.fetch("example.test", dialect="draft03")
    assert (policy.mode, policy.dialect, text) == ("testing", "draft03", doc)  # type: ignore[attr-defined]
    assert [r.path for r in world.server.requests] == [JSON_PATH]


async def test_sts_25_policy_server_in_a_thread(pki: TestPki, fake_dns: FakeDns, resolver: Resolver) -> None:
    """STS-25 with the server on its own thread and loop (as used for subprocess relays)."""
    threaded = PolicyServer(pki, "127.0.0.7")
    threaded.start_in_thread()
    try:
        threaded.policy("example.test", POLICY)
        fake_dns.zone.add("mta-sts.example.test", "A", "127.0.0.7")
        policy, _ = await fetch_policy(
            "example.test", https_port=threaded.port, resolver=resolver, ca_file=str(pki.ca_file), timeout=3.0
        )
        assert policy.mode == "enforce"
        assert [r.path for r in threaded.requests] == [TXT_PATH]
    finally:
        threaded.stop_thread()
