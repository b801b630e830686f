"""TLS reporting end to end (RFC 8460): a day of mixed outcomes through `mta serve`, then `mta tlsrpt send`."""

from __future__ import annotations

import base64
import datetime
import email
import email.policy
import gzip
import json
from typing import Any

import dkim
import pytest

from tests.support.relay import run_cli
from tests.support.world import World

RUA = "tlsrpt@rua.test"

# domain -> (MX certificate, policy patterns, policy-host behaviour, expected result type or None for success)
CASES: dict[str, tuple[str | None, list[str] | None, dict[str, Any], str | None]] = {
    "ok.test": ("valid", None, {}, None),
    "notls.test": (None, None, {}, "starttls-not-supported"),
    "badname.test": ("wrong-name", None, {}, "certificate-host-mismatch"),
    "expired.test": ("expired", None, {}, "certificate-expired"),
    "untrusted.test": ("untrusted", None, {}, "certificate-not-trusted"),
    "mismatch.test": ("valid", ["mx.elsewhere.test"], {}, "validation-failure"),
    "fetcherr.test": ("valid", None, {"status": 404}, "sts-policy-fetch-error"),
    "invalid.test": ("valid", None, {"body": "version: STSv1\nmode: sometimes\n"}, "sts-policy-invalid"),
    "webpki.test": ("valid", None, {"cert": "untrusted"}, "sts-webpki-invalid"),
    # testing mode (STS-84): delivered to an MX outside the policy, and reported
    "testing.test": ("valid", ["mx.elsewhere.test"], {"mode": "testing"}, "validation-failure"),
}


def build(world: World) -> None:
    world.mx_host("mx.rua.test", "127.0.0.49")
    world.domain("rua.test", [(10, "mx.rua.test")])
    for i, (domain, (cert, patterns, behaviour, _expected)) in enumerate(CASES.items()):
        mx_name = f"mx.{domain}"
        world.mx_host(mx_name, f"127.0.0.{50 + i}", cert=cert)
        world.domain(domain, [(10, mx_name)])
        behaviour = dict(behaviour)
        pcert = behaviour.pop("cert", "valid")
        world.sts(domain, behaviour.pop("mode", "enforce"), patterns or [mx_name], cert=pcert)
        if behaviour:
            world.policy.set(f"mta-sts.{domain}", **behaviour)
        world.zone.add(f"_smtp._tls.{domain}", "TXT", f'"v=TLSRPTv1; rua=mailto:{RUA}"')


def dkim_key(world: World) -> tuple[str, bytes]:
    """A fresh RSA key on disk and its public half as a DKIM key record."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = world.tmp / "dkim.pem"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return str(path), b"v=DKIM1; k=rsa; s=tlsrpt; p=" + base64.b64encode(der)


@pytest.mark.req("RPT-8", "RPT-9", "RPT-11", "RPT-16", "RPT-18", "RPT-23", "STS-92")
def test_rpt_day_of_mixed_outcomes_reported_once_by_mail(world: World) -> None:
    build(world)
    key_file, key_record = dkim_key(world)
    data = world.config(tlsrpt={"enabled": True, "organization_name": "Test Org",
                                "contact_info": "tlsrpt@relay.test", "report_sender": "reports@relay.test",
                                "db_path": str(world.tmp / "queue" / "tlsrpt.db")},
                        # RPT-18: report mails are signed with the general [dkim] keys
                        dkim={"keys": [{"domain": "relay.test", "selector": "rpt", "key_file": key_file}]})
    relay = world.relay(data)
    for domain in CASES:
        world.submit(relay, [f"bob@{domain}"])
    relay.wait_event("delivered", count=5)  # ok, testing, and the three discovery failures (delivered without policy)
    relay.wait_event("deferred", count=5)
    today = datetime.datetime.now(datetime.UTC).date()
    out = run_cli(relay.config, "tlsrpt", "send", "--date", today.isoformat(), "--json", timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    sent = {r["domain"]: r for r in json.loads(out.stdout)}
    assert {d for d, r in sent.items() if r["status"] == "sent"} == set(CASES)
    rua_mx = world.mxs["mx.rua.test"]

    def dns_key(name: bytes, timeout: int = 5) -> bytes | None:
        return key_record if name == b"rpt._domainkey.relay.test." else None

    mails = rua_mx.wait_for_messages_blocking(len(CASES), timeout=20)
    reports: dict[str, dict[str, Any]] = {}
    for m in mails:
        assert m.rcpt_tos == [RUA] and m.mail_from == "reports@relay.test"  # RPT-23: a real envelope sender
        # RPT-18: DKIM-signed by the submitter domain, no l=, TLS-Report-* headers covered
        assert dkim.verify(m.data, tlsrpt="strict", dnsfunc=dns_key)
        sig = m.data.split(b"\r\n\r\n", 1)[0].decode()
        assert "d=relay.test" in sig and " l=" not in sig and "tls-report-domain" in sig.lower()
        msg = email.message_from_bytes(m.data, policy=email.policy.default)
        assert msg.get_content_type() == "multipart/report" and msg.get_param("report-type") == "tlsrpt"
        domain = str(msg["TLS-Report-Domain"])
        assert msg["TLS-Report-Submitter"] == "relay.test"  # RPT-18
        assert str(msg["Subject"]).startswith(f"Report Domain: {domain} Submitter: relay.test Report-ID: ")
        [att] = [p for p in msg.iter_attachments() if p.get_content_type() == "application/tlsrpt+gzip"]
        fname = att.get_filename()
        assert fname.startswith(f"relay.test!{domain}!") and fname.endswith(".json.gz")  # RPT-16
        reports[domain] = json.loads(gzip.decompress(att.get_content()))
    assert set(reports) == set(CASES)
    for domain, (_cert, _patterns, _beh, expected) in CASES.items():
        rep = reports[domain]
        assert rep["organization-name"] == "Test Org" and rep["contact-info"] == "tlsrpt@relay.test"
        assert rep["date-range"] == {"start-datetime": f"{today}T00:00:00Z", "end-datetime": f"{today}T23:59:59Z"}
        [pol] = rep["policies"]
        assert pol["policy"]["policy-type"] == "sts" and pol["policy"]["policy-domain"] == domain
        if domain == "testing.test":
            assert pol["policy"]["policy-string"][1] == "mode: testing"
            assert [f["failure-reason-code"] for f in pol["failure-details"]] == ["sts-mx-mismatch"]
        summary = pol["summary"]
        if expected is None:
            assert summary == {"total-successful-session-count": 1, "total-failure-session-count": 0}
            assert pol["policy"]["policy-string"][:2] == ["version: STSv1", "mode: enforce"]
            assert pol["policy"]["mx-host"] == [f"mx.{domain}"]
            continue
        assert summary["total-failure-session-count"] >= 1, (domain, summary)
        types = {f["result-type"] for f in pol["failure-details"]}
        assert expected in types, (domain, pol["failure-details"])
        for f in pol["failure-details"]:
            assert isinstance(f["failed-session-count"], int) and f["failed-session-count"] >= 1
            if f["result-type"].startswith("certificate") or f["result-type"] == "starttls-not-supported":
                assert f["receiving-mx-hostname"] == f"mx.{domain}"
                assert f["receiving-ip"].startswith("127.0.0.")
    # Exactly once: a second send and a send after restart skip every domain.
    again = json.loads(run_cli(relay.config, "tlsrpt", "send", "--date", today.isoformat(), "--json",
                               timeout=60).stdout)
    assert {r["status"] for r in again} == {"skipped"}
    relay.stop()
    relay = world.relay(data)
    third = json.loads(run_cli(relay.config, "tlsrpt", "send", "--date", today.isoformat(), "--json",
                               timeout=60).stdout)
    assert {r["status"] for r in third} == {"skipped"}
    assert len(rua_mx.messages) == len(CASES)
