"""Where mta keeps its own code next to a library's (issue 11 section 3), each test here shows
what the library's public API cannot do; the comment at our code names the test.

- net/tls.py: PEM bundle loading, the peer's chain, the DNS-ID matcher.
- net/dns.py: the answer cache (dnspython's Cache/LRUCache).
- delivery/smtp_client.py: DATA with its own timeouts (aiosmtplib's data()).
- delivery/pipeline.py: reading pipelined replies (aiosmtplib's SMTPProtocol).
- submission/listener.py: the DATA reader (aiosmtpd's smtp_DATA).
"""

from __future__ import annotations

import asyncio
import inspect
import ssl
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import aiosmtplib
import dns.asyncresolver
import dns.name
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import pytest
import trustme
from aiosmtpd.smtp import SMTP
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.verification import Criticality, ExtensionPolicy, PolicyBuilder, Store

from mta.net.dns import MAX_NEGATIVE_TTL, MAX_POSITIVE_TTL
from mta.net.tls import _load_pem_bundle, dns_id_matches, opportunistic_context, peer_chain, verify_chain
from tests.support.fake_dns import FakeDns, Zone
from tests.support.pki import TestPki
from tests.support.submission import RawClient, start_server

ADDR = "127.0.0.43"


# --- net/tls.py ----------------------------------------------------------------------------------------

def test_pem_bundle_with_one_bad_certificate_keeps_the_others(tmp_path: Path) -> None:
    good = trustme.CA().cert_pem.bytes()
    broken = b"-----BEGIN CERTIFICATE-----\nTUlJQm9ndXM=\n-----END CERTIFICATE-----\n"
    bundle = broken + good
    with pytest.raises(ValueError):
        x509.load_pem_x509_certificates(bundle)  # the library gives up on the whole bundle
    [cert] = _load_pem_bundle(bundle)  # ours keeps every certificate that parses
    assert cert == x509.load_pem_x509_certificate(good)


def test_cryptography_name_matcher_accepts_what_openssl_refuses(tmp_path: Path) -> None:
    """cryptography's server verifier matches `*.com` for `example.com`; OpenSSL (and ID-9) do not,
    so the report path keeps our matcher to give OpenSSL's verdict (TRUST-2)."""
    pki = TestPki(tmp_path / "pki")
    leaf = pki.custom_leaf("x", ["*.com"])
    cert = x509.load_pem_x509_certificate(leaf.cert_path.read_bytes())
    store = Store([x509.load_pem_x509_certificate(pki.ca_file.read_bytes())])
    # OpenSSL's profile (no CA/B-Forum extension rules), as verify_chain builds it, with the library's name check
    ca_policy = ExtensionPolicy.permit_all().require_present(x509.BasicConstraints, Criticality.AGNOSTIC, None)
    ee_policy = ExtensionPolicy.permit_all().require_present(x509.SubjectAlternativeName, Criticality.AGNOSTIC, None)
    builder = PolicyBuilder().store(store).extension_policies(ca_policy=ca_policy, ee_policy=ee_policy)
    builder.build_server_verifier(x509.DNSName("example.com")).verify(cert, [])  # no error: "*.com" matched
    assert not dns_id_matches("example.com", "*.com")
    der = cert.public_bytes(serialization.Encoding.DER)
    assert verify_chain([der], str(pki.ca_file), "example.com")[0] is False


async def test_peer_chain_needs_the_intermediates_python_311_hides(tmp_path: Path) -> None:
    """Only the leaf is public before Python 3.13 (getpeercert); with it alone a chain through an
    intermediate reads "untrusted", so peer_chain reaches the chain (private `_sslobj` on 3.11/3.12)."""
    root = trustme.CA()
    leaf = root.create_child_ca().issue_cert("mx.example.com")
    ca_file = tmp_path / "ca.pem"
    root.cert_pem.write_to_path(str(ca_file))
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    leaf.configure_cert(server_ctx)
    server = await asyncio.start_server(lambda r, w: None, ADDR, 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        _, writer = await asyncio.open_connection(ADDR, port, ssl=opportunistic_context(),
                                                  server_hostname="mx.example.com")
        ssl_object = writer.get_extra_info("ssl_object")
        if sys.version_info < (3, 13):
            assert not hasattr(ssl_object, "get_unverified_chain")  # no public way to the chain
        leaf_only = [ssl_object.getpeercert(binary_form=True)]
        assert verify_chain(leaf_only, str(ca_file), "mx.example.com")[0] is False
        chain = peer_chain(ssl_object)
        assert len(chain) == 2
        assert verify_chain(chain, str(ca_file), "mx.example.com") == (True, None)
        writer.close()
    finally:
        server.close()


# --- net/dns.py ----------------------------------------------------------------------------------------

async def test_dnspython_cache_keeps_answers_for_their_whole_ttl() -> None:
    """dnspython's caches keep an answer for its full TTL and read the wall clock; ours caps positive
    answers at MAX_POSITIVE_TTL (a day-long TTL must not pin an MX or an `_mta-sts` id) and negatives
    at MAX_NEGATIVE_TTL, with an injectable clock for tests."""
    for cache_class in (dns.resolver.Cache, dns.resolver.LRUCache):
        params = set(inspect.signature(cache_class.__init__).parameters) - {"self"}
        assert params <= {"cleaning_interval", "max_size"}, params  # no TTL bound, no clock
    zone = Zone()
    zone.add("long.example.test", "TXT", '"x"', ttl=86400)
    with FakeDns(zone, host="127.0.0.53") as server:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [server.host]
        resolver.port = server.port
        resolver.cache = dns.resolver.LRUCache()
        await resolver.resolve("long.example.test", "TXT")
        key = (dns.name.from_text("long.example.test"), dns.rdatatype.TXT, dns.rdataclass.IN)
        cached = resolver.cache.get(key)
        assert cached is not None and cached.expiration - time.time() > 86000 > MAX_POSITIVE_TTL
    assert MAX_NEGATIVE_TTL < MAX_POSITIVE_TTL


# --- delivery/smtp_client.py -----------------------------------------------------------------------------

def test_aiosmtplib_data_has_one_timeout_for_every_step() -> None:
    """SMTP-31 (RFC 5321 §4.5.3.2) wants 2 min for the 354, 3 min per data block and 10 min for the
    final reply; aiosmtplib's public data() takes one timeout for all of them and writes the body
    without waiting for the transport, so SmtpSession._data spells the steps out."""
    params = inspect.signature(aiosmtplib.SMTP.data).parameters
    assert [p for p in params if p != "self"] == ["message", "timeout"]
    source = inspect.getsource(aiosmtplib.protocol.SMTPProtocol.execute_data_command)
    assert source.count("read_response(timeout=timeout)") == 2 and "drain" not in source


async def _two_replies(chunks: list[bytes]) -> tuple[str, type[BaseException] | str]:
    """aiosmtplib's protocol after writing two commands at once (RFC 2920) to a server that answers
    with `chunks` (written 50 ms apart): the first reply's text, then the second's or what was raised
    (a pipelining client reads the second reply after handling the first)."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 raw.test\r\n")
        await reader.readline()
        writer.write(b"250 raw.test\r\n")  # EHLO
        await reader.readline()
        await reader.readline()
        for chunk in chunks:
            writer.write(chunk)
            await writer.drain()
            await asyncio.sleep(0.05)
        await reader.read()  # until the client closes
        writer.close()

    server = await asyncio.start_server(serve, ADDR, 0)
    smtp = aiosmtplib.SMTP(hostname=ADDR, port=server.sockets[0].getsockname()[1], start_tls=False, timeout=2)
    try:
        await smtp.connect()
        await smtp.ehlo(hostname="relay.test")
        protocol = smtp.protocol
        assert protocol is not None
        protocol.write(b"MAIL FROM:<a@src.test>\r\nRCPT TO:<b@dst.test>\r\n")
        first = (await protocol.read_response(timeout=1)).message
        await asyncio.sleep(0.2)  # the client handles the first reply; the second arrives meanwhile
        try:
            second: type[BaseException] | str = (await protocol.read_response(timeout=0.5)).message
        except aiosmtplib.SMTPReadTimeoutError as exc:
            second = type(exc)
        return first, second
    finally:
        smtp.close()
        server.close()


@pytest.mark.parametrize("chunks", [
    [b"250 one\r\n250 two\r\n"],  # both replies in one segment: the second is never parsed
    [b"250 one\r\n", b"250 two\r\n"],  # the second arrives while the first awaits pickup: dropped
])
async def test_aiosmtplib_protocol_cannot_read_pipelined_replies(chunks: list[bytes]) -> None:
    """PERF-6: SMTPProtocol reads one reply per command it writes itself. With MAIL and RCPT written
    together the second reply is lost (or kept unparsed, to be mis-paired with a later command), so
    mta.delivery.pipeline.ReplyReader reads a transaction's replies in aiosmtplib's protocol's place."""
    first, second = await _two_replies(chunks)
    assert first == "one"
    assert second is aiosmtplib.SMTPReadTimeoutError


# --- submission/listener.py --------------------------------------------------------------------------------

class _Sink:
    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return "250 OK"


async def _peak_while_sending(host: str, port: int, megabytes: int) -> tuple[float, bytes]:
    """Peak traced memory (MB) while a client sends `megabytes` MB without a CRLF inside DATA."""
    c = await RawClient.connect(host, port)
    for line in (b"EHLO c.test\r\n", b"MAIL FROM:<a@src.test>\r\n", b"RCPT TO:<b@dst.test>\r\n"):
        assert (await c.send(line)).startswith(b"250")
    assert (await c.send(b"DATA\r\n")).startswith(b"354")
    chunk = b"x" * 65536
    tracemalloc.reset_peak()
    for _ in range(megabytes * 16):
        c.writer.write(chunk)
        await c.writer.drain()
    reply = await c.send(b"\r\n.\r\n", timeout=20)
    peak = tracemalloc.get_traced_memory()[1] / 1e6
    c.close()
    return peak, reply


async def test_aiosmtpd_data_keeps_every_fragment_of_an_endless_line(tmp_path: Path) -> None:
    """aiosmtpd 1.4's smtp_DATA keeps each fragment of a line without CRLF until the CRLF comes, even
    once it has decided to refuse the message: memory grows with what the client sends. Ours drops
    them (listener.RelaySMTP.smtp_DATA)."""
    loop = asyncio.get_running_loop()
    stock = await loop.create_server(lambda: SMTP(_Sink(), data_size_limit=1_000_000), "127.0.0.1", 0)
    ours = await start_server(tmp_path / "q", tmp_path, listen=["127.0.0.1:0"], max_message_size="1MB")
    tracemalloc.start()
    try:
        stock_peak, stock_reply = await _peak_while_sending("127.0.0.1", stock.sockets[0].getsockname()[1], 6)
        our_peak, our_reply = await _peak_while_sending(ours.host, ours.port, 6)
    finally:
        tracemalloc.stop()
        stock.close()
        await ours.listeners.stop()
    assert stock_reply[:3] in (b"500", b"552") and our_reply.startswith(b"552")
    assert stock_peak > 5, stock_peak  # the whole 6 MB line held in memory
    assert our_peak < 2, our_peak
