"""Issue 10 items 6, 7, 10: smart-host credentials only over TLS, one certificate verdict for
testing and enforce mode, and the outgoing source address - against real fake MX servers."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mta.delivery.smtp_client import BindAddresses, SmtpSession, Timeouts, TlsMode
from mta.errors import TransientDeliveryError
from mta.net.tls import verify_chain, verifying_context
from mta.sts.decide import check_tls
from mta.sts.policy import Policy
from tests.support.fake_mx import FakeMx
from tests.support.pki import Leaf, TestPki
from tests.support.relay import run_cli, write_config

MX = "mx1.example.com"
ADDR = "127.0.0.42"
FAST = Timeouts(connect=2, greeting=2, ehlo=2, mail=2, rcpt=2, data_init=2, data_block=2, data_final=2)
SERVER_AUTH, CLIENT_AUTH, ANY_EKU = "1.3.6.1.5.5.7.3.1", "1.3.6.1.5.5.7.3.2", "2.5.29.37.0"


@pytest.fixture
def pki(tmp_path: Path) -> TestPki:
    return TestPki(tmp_path / "pki")


async def _open(mx: FakeMx, pki: TestPki, mode: TlsMode = TlsMode.MAY, **kwargs: Any) -> SmtpSession:
    return await SmtpSession.open(address=ADDR, port=mx.port, mx_host=MX, helo_name="relay.test", tls_mode=mode,
                                  ca_file=str(pki.ca_file), timeouts=FAST, **kwargs)


# --- item 6: AUTH credentials never travel without TLS ------------------------------------------------

async def test_issue10_item6_trust_1_no_auth_when_smarthost_offers_no_starttls(pki: TestPki, fake_mx: Any) -> None:
    mx = await fake_mx(credentials={"relay": "s3cret"})  # AUTH offered in plaintext, no STARTTLS
    session = await _open(mx, pki)
    with pytest.raises(TransientDeliveryError) as info:
        await session.login("relay", "s3cret")
    reply = info.value.reply
    assert reply.code == 451 and reply.enhanced == "4.7.0"
    assert "never sent without TLS" in reply.text and "does not offer STARTTLS" in reply.text
    [rec] = await mx.wait_for_sessions(1, closed=True)
    assert not rec.saw("AUTH") and rec.auth_user is None


async def test_issue10_item6_trust_1_no_auth_after_plaintext_retry_of_failed_handshake(pki: TestPki,
                                                                                     fake_mx: Any) -> None:
    mx = await fake_mx(tls_context=pki.leaf(MX).server_context(), broken_tls=True, credentials={"relay": "s3cret"})
    session = await _open(mx, pki)  # SMTP-16: the failed handshake is retried in plaintext
    assert session.tls is not None and session.tls.version is None
    with pytest.raises(TransientDeliveryError) as info:
        await session.login("relay", "s3cret")
    assert "never sent without TLS" in info.value.reply.text and "TLS failed" in info.value.reply.text
    sessions = await mx.wait_for_sessions(2, closed=True)
    assert not any(s.saw("AUTH") for s in sessions)


async def test_issue10_item6_trust_1_auth_over_opportunistic_tls_still_works(pki: TestPki, fake_mx: Any) -> None:
    mx = await fake_mx(tls_context=pki.leaf(MX).server_context(), credentials={"relay": "s3cret"})
    session = await _open(mx, pki)
    await session.login("relay", "s3cret")
    await session.close()
    assert mx.sessions[0].auth_user == "relay" and mx.sessions[0].starttls


def test_issue10_item6_trust_1_check_config_names_may_with_credentials(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("pw\n")
    data = {"queue": {"path": str(tmp_path / "q")},
            "delivery": {"relayhost": "smarthost.test:587", "relayhost_tls": "may",
                         "relayhost_username": "u", "relayhost_password_file": str(secret)}}
    out = run_cli(write_config(tmp_path, data), "check-config")
    assert out.returncode == 0, out.stderr
    assert "warning:" in out.stderr and "delivery.relayhost_tls" in out.stderr and "relayhost_username" in out.stderr
    data["delivery"]["relayhost_tls"] = "verify"
    out = run_cli(write_config(tmp_path, data), "check-config")
    assert out.returncode == 0 and "warning" not in out.stderr


# --- item 7: the testing-mode (report) verdict equals the enforce-mode verdict ------------------------

def _leaves(pki: TestPki) -> dict[str, Leaf]:
    return {
        "valid": pki.leaf(MX),
        "eku-server": pki.custom_leaf(MX, [MX], [SERVER_AUTH, CLIENT_AUTH]),
        "eku-client-only": pki.custom_leaf(MX, [MX], [CLIENT_AUTH]),
        "eku-any-only": pki.custom_leaf(MX, [MX], [ANY_EKU]),
        "expired": pki.leaf(MX, expired=True),
        "untrusted": pki.leaf(MX, untrusted=True),
        "wrong-name": pki.leaf("mx2.example.com"),
        "cn-only": pki.cn_only_leaf(MX),
        "wildcard": pki.leaf("*.example.com"),
        "partial-wildcard": pki.custom_leaf("x", ["mx*.example.com"]),
        "san-trailing-dot": pki.custom_leaf("x", [MX + "."]),
    }


async def _openssl_verdict(leaf: Leaf, ca_file: str) -> tuple[bool, str | None]:
    """What enforce mode sees: a handshake with the verifying context against this certificate."""
    server = await asyncio.start_server(lambda r, w: w.close(), ADDR, 0, ssl=leaf.server_context())
    port = server.sockets[0].getsockname()[1]
    try:
        _, writer = await asyncio.open_connection(ADDR, port, ssl=verifying_context(ca_file), server_hostname=MX)
        writer.close()
        return True, None
    except ssl.SSLCertVerificationError as exc:
        return False, f"certificate verify failed: {exc.verify_message}"
    finally:
        server.close()


def _der_chain(leaf: Leaf) -> list[bytes]:
    certs = x509.load_pem_x509_certificates(leaf.cert_path.read_bytes())
    return [c.public_bytes(serialization.Encoding.DER) for c in certs]


async def test_issue10_item7_trust_2_report_verdict_equals_enforce_verdict(pki: TestPki) -> None:
    ca_file = str(pki.ca_file)
    for kind, leaf in _leaves(pki).items():
        enforce = await _openssl_verdict(leaf, ca_file)
        report = verify_chain(_der_chain(leaf), ca_file, MX)
        assert report == enforce, kind
    assert (await _openssl_verdict(_leaves(pki)["eku-client-only"], ca_file))[0] is False  # the case of item 7


async def test_issue10_item7_trust_2_testing_session_reports_client_only_certificate(pki: TestPki,
                                                                                   fake_mx: Any) -> None:
    leaf = pki.custom_leaf(MX, [MX], [CLIENT_AUTH])
    mx = await fake_mx(tls_context=leaf.server_context())
    session = await _open(mx, pki)  # testing mode: opportunistic TLS, checked after the fact
    await session.close()
    assert session.tls is not None and session.tls.version is not None and not session.tls.verified
    testing = Policy("testing", ("mx1.example.com",), 86400)
    verdict = check_tls(testing, session.starttls_offered, session.tls)
    assert verdict.result_type == "validation-failure"  # as enforce mode (OpenSSL's error 26) reports it
    with pytest.raises(TransientDeliveryError) as info:
        await _open(mx, pki, TlsMode.VERIFY)
    assert "unsuitable certificate purpose" in info.value.reply.text


# --- item 10: outgoing connections bind to delivery.bind_address ---------------------------------------

async def test_issue10_item10_cfg_2_outgoing_connection_binds_source_address(pki: TestPki, fake_mx: Any) -> None:
    mx = await fake_mx(tls_context=pki.leaf(MX).server_context())
    session = await _open(mx, pki, bind=BindAddresses(ipv4="127.0.0.77"))
    assert session.local_address == "127.0.0.77"
    await session.close()
    [rec] = await mx.wait_for_sessions(1, closed=True)
    assert rec.peer[0] == "127.0.0.77"
    session = await _open(mx, pki)  # default: the kernel's choice (127.0.0.1 towards 127.0.0.42)
    await session.close()
    assert session.local_address != "127.0.0.77"

