"""DANE for SMTP end to end (RFC 7672): a real `mta serve` behind a real validating resolver.

Our own `unbound` (tests/support/dnssec.py) validates zones the test DNS server signs on the fly:
`dane.test` is signed (its anchor is configured in unbound), `plain.test` and everything else in
`test.` are insecure. MX hosts present certificates from the test PKI; TLSA records pin them.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.support.dkim import make_key
from tests.support.dnssec import SignedZone, Unbound
from tests.support.fake_mx import FakeMx
from tests.support.pki import Leaf
from tests.support.relay import RelayProcess, run_cli, write_config
from tests.support.world import World


class DaneWorld:
    def __init__(self, tmp: Path) -> None:
        self.zone = SignedZone()
        self.world = World(tmp, zone=self.zone)
        try:
            anchor = self.zone.sign("dane.test")
            self.resolver = Unbound(self.world.dns, [anchor], tmp / "unbound").start()
        except BaseException:
            self.world.close()
            raise

    def close(self) -> None:
        self.resolver.stop()
        self.world.close()

    def config(self, **extra: Any) -> dict[str, Any]:
        return self.world.config(dns={"nameservers": [self.resolver.host], "port": self.resolver.port,
                                      "dnssec": True, "timeout": "2s"},
                                 dane={"enabled": True}, **extra)

    def relay(self, **extra: Any) -> RelayProcess:
        return self.world.relay(self.config(**extra))

    def owner(self, host: str) -> str:
        """The TLSA owner name: the port is the relay's `delivery.smtp_port` (DANE-2)."""
        return f"_{self.world.smtp_port}._tcp.{host}"

    def tlsa(self, host: str, text: str) -> None:
        self.zone.add(self.owner(host), "TLSA", text)

    def break_tlsa(self, host: str, how: str) -> None:
        self.zone.break_rrset(self.owner(host), "TLSA", how)

    def mx(self, name: str, address: str, leaf: Leaf | None) -> FakeMx:
        """An MX host presenting `leaf` (None: no STARTTLS at all)."""
        mx = self.world.mx_host(name, address, cert=None)
        mx.tls_context = leaf.server_context() if leaf is not None else None
        return mx

    def ta_leaf(self, name: str) -> tuple[Leaf, bytes]:
        """A leaf under a private intermediate (not PKIX-trusted) and the intermediate's DER."""
        inter = self.world.pki.untrusted_ca.create_child_ca()
        cert = inter.issue_cert(name)
        folder = self.world.tmp / "pki"
        cert_path, key_path = folder / f"ta-{name}.pem", folder / f"ta-{name}.key"
        cert_path.write_bytes(b"".join(b.bytes() for b in cert.cert_chain_pems))  # leaf + intermediate
        cert.private_key_pem.write_to_path(str(key_path))
        return Leaf(cert_path, key_path), _der(inter.cert_pem.bytes())


def _der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)


def spki_sha256(leaf: Leaf) -> str:
    cert = x509.load_pem_x509_certificate(leaf.cert_path.read_bytes())
    return hashlib.sha256(cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)).hexdigest()


@pytest.fixture
def dane(tmp_path: Path) -> Iterator[DaneWorld]:
    d = DaneWorld(tmp_path)
    try:
        yield d
    finally:
        d.close()


def test_dane_1_resolver_reports_secure_and_insecure(dane: DaneWorld) -> None:
    dane.world.domain("dane.test", [(10, "mx1.dane.test")])
    dane.world.domain("plain.test", [(10, "mx.plain.test")])
    assert dane.resolver.secure("dane.test", "MX") and not dane.resolver.secure("plain.test", "MX")


def test_dane_2_5_6_ee_success_sni_is_the_base_domain(dane: DaneWorld) -> None:
    leaf = dane.world.pki.leaf("mx1.dane.test", untrusted=True)  # no PKIX path: only DANE can accept it
    mx = dane.mx("mx1.dane.test", "127.0.0.21", leaf)
    dane.world.domain("dane.test", [(10, "mx1.dane.test")])
    dane.tlsa("mx1.dane.test", f"3 1 1 {spki_sha256(leaf)}")
    relay = dane.relay()
    qid = dane.world.submit(relay, ["bob@dane.test"])
    [msg] = mx.wait_for_messages_blocking(1, timeout=15)
    assert msg.sni == "mx1.dane.test"  # DANE-6
    [ev] = relay.wait_event("delivered", queue_id=qid)
    assert ev["policy"] == "dane" and ev["verified"] is True and ev["tls"] in ("TLSv1.2", "TLSv1.3")
    assert dane.world.dns.count(dane.owner("mx1.dane.test"), "TLSA") >= 1


def test_dane_5_ta_success(dane: DaneWorld) -> None:
    leaf, inter = dane.ta_leaf("mx1.dane.test")
    mx = dane.mx("mx1.dane.test", "127.0.0.21", leaf)
    dane.world.domain("dane.test", [(10, "mx1.dane.test")])
    dane.tlsa("mx1.dane.test", f"2 0 1 {hashlib.sha256(inter).hexdigest()}")
    relay = dane.relay()
    qid = dane.world.submit(relay, ["bob@dane.test"])
    mx.wait_for_messages_blocking(1, timeout=15)
    [ev] = relay.wait_event("delivered", queue_id=qid)
    assert ev["policy"] == "dane" and ev["verified"] is True


def test_dane_5_ta_wrong_name_defers(dane: DaneWorld) -> None:
    leaf, inter = dane.ta_leaf("other.dane.test")
    mx = dane.mx("mx1.dane.test", "127.0.0.21", leaf)
    dane.world.domain("dane.test", [(10, "mx1.dane.test")])
    dane.tlsa("mx1.dane.test", f"2 0 1 {hashlib.sha256(inter).hexdigest()}")
    relay = dane.relay()
    qid = dane.world.submit(relay, ["bob@dane.test"])
    [ev] = relay.wait_event("deferred", queue_id=qid)
    assert ev["status"] == "4.7.5" and "DANE" in ev["reply"] and ev["policy"] == "dane"
    assert mx.messages == [] and not mx.saw("MAIL")


def test_dane_7_sts_90_rpt_19_mismatch_defers_despite_valid_sts_and_is_reported_twice(dane: DaneWorld) -> None:
    world = dane.world
    mx = world.mx_host("mx1.dane.test", "127.0.0.21", cert="valid")  # PKIX-valid: MTA-STS would accept
    world.domain("dane.test", [(10, "mx1.dane.test")])
    world.sts("dane.test", "enforce", ["mx1.dane.test"])
    dane.tlsa("mx1.dane.test", "3 1 1 " + "ab" * 32)
    world.zone.add("_smtp._tls.dane.test", "TXT", '"v=TLSRPTv1; rua=mailto:tlsrpt@dane.test"')
    db = world.tmp / "queue" / "tlsrpt.db"
    key = make_key(world.tmp / "keys", "relay.test", "rpt")  # report mails are DKIM-signed (RPT-18)
    relay = dane.relay(tlsrpt={"enabled": True, "contact_info": "tlsrpt@relay.test",
                               "report_sender": "reports@relay.test", "db_path": str(db)},
                       dkim={"keys": [key.config()]})
    qid = world.submit(relay, ["bob@dane.test"])
    [ev] = relay.wait_event("deferred", queue_id=qid)
    assert ev["status"] == "4.7.5" and "DANE" in ev["reply"] and ev["policy"] == "dane"
    assert ev["sts_mode"] == "enforce"
    assert mx.messages == [] and not mx.saw("MAIL")  # STS-90: never rescued by the PKIX success
    today = datetime.datetime.now(datetime.UTC).date().isoformat()
    out = run_cli(relay.config, "tlsrpt", "show", "--date", today, "--json", timeout=30)
    [entry] = [e for e in json.loads(out.stdout)["reports"] if e["domain"] == "dane.test"]
    policies = {p["policy"]["policy-type"]: p for p in entry["report"]["policies"]}
    assert set(policies) == {"sts", "tlsa"}  # reported under each policy that applied
    tlsa = policies["tlsa"]
    assert tlsa["policy"]["policy-string"] == ["3 1 1 " + "AB" * 32]
    assert tlsa["summary"]["total-failure-session-count"] >= 1
    assert {d["result-type"] for d in tlsa["failure-details"]} == {"tlsa-invalid"}
    assert tlsa["failure-details"][0]["receiving-mx-hostname"] == "mx1.dane.test"
    assert policies["sts"]["summary"]["total-successful-session-count"] >= 1  # PKIX view: fine
    # RPT-19: the report itself reaches the very MX whose TLSA records do not match.
    sent = json.loads(run_cli(relay.config, "tlsrpt", "send", "--date", today, "--json", timeout=60).stdout)
    assert [r["domain"] for r in sent] == ["dane.test"]
    [report] = mx.wait_for_messages_blocking(1, timeout=20)
    assert report.rcpt_tos == ["tlsrpt@dane.test"]


@pytest.mark.parametrize("how", ["expired", "missing"])
def test_dane_3_bogus_tlsa_defers_without_dialling(dane: DaneWorld, how: str) -> None:
    leaf = dane.world.pki.leaf("mx1.dane.test")
    mx = dane.mx("mx1.dane.test", "127.0.0.21", leaf)
    dane.world.domain("dane.test", [(10, "mx1.dane.test")])
    dane.tlsa("mx1.dane.test", f"3 1 1 {spki_sha256(leaf)}")
    dane.break_tlsa("mx1.dane.test", how)
    relay = dane.relay()
    qid = dane.world.submit(relay, ["bob@dane.test"])
    [ev] = relay.wait_event("deferred", queue_id=qid)
    assert ev["status"] == "4.7.5" and "DANE" in ev["reply"] and ev["policy"] == "dane"
    assert mx.sessions == []  # DANE-3: unusable, never "no TLSA"


def test_dane_3_bogus_host_skipped_for_the_next_mx(dane: DaneWorld) -> None:
    leaf1, leaf2 = dane.world.pki.leaf("mx1.dane.test"), dane.world.pki.leaf("mx2.dane.test")
    mx1 = dane.mx("mx1.dane.test", "127.0.0.21", leaf1)
    mx2 = dane.mx("mx2.dane.test", "127.0.0.22", leaf2)
    dane.world.domain("dane.test", [(10, "mx1.dane.test"), (20, "mx2.dane.test")])
    dane.tlsa("mx1.dane.test", f"3 1 1 {spki_sha256(leaf1)}")
    dane.tlsa("mx2.dane.test", f"3 1 1 {spki_sha256(leaf2)}")
    dane.break_tlsa("mx1.dane.test", "bad")
    relay = dane.relay()
    qid = dane.world.submit(relay, ["bob@dane.test"])
    mx2.wait_for_messages_blocking(1, timeout=15)
    [ev] = relay.wait_event("delivered", queue_id=qid)
    assert ev["mx"] == "mx2.dane.test" and ev["policy"] == "dane"
    assert mx1.sessions == []


@pytest.mark.parametrize("sts_mode", [None, "enforce"])
def test_dane_1_insecure_zone_gets_no_dane_and_no_tlsa_query(dane: DaneWorld, sts_mode: str | None) -> None:
    world = dane.world
    mx = world.mx_host("mx.plain.test", "127.0.0.23", cert="valid")
    world.domain("plain.test", [(10, "mx.plain.test")])
    dane.tlsa("mx.plain.test", "3 1 1 " + "ab" * 32)  # unsigned: must be ignored
    if sts_mode:
        world.sts("plain.test", sts_mode, ["mx.plain.test"])
    relay = dane.relay()
    qid = world.submit(relay, ["bob@plain.test"])
    mx.wait_for_messages_blocking(1, timeout=15)
    [ev] = relay.wait_event("delivered", queue_id=qid)
    assert ev["policy"] == ("mta-sts" if sts_mode else "none")
    assert world.dns.count(dane.owner("mx.plain.test"), "TLSA") == 0  # never slowed down by DANE


def test_dane_4_all_unusable_tlsa_means_tls_without_authentication(dane: DaneWorld) -> None:
    leaf = dane.world.pki.leaf("mx1.dane.test", untrusted=True)
    mx = dane.mx("mx1.dane.test", "127.0.0.21", leaf)
    dane.world.domain("dane.test", [(10, "mx1.dane.test")])
    dane.tlsa("mx1.dane.test", f"1 1 1 {spki_sha256(leaf)}")  # PKIX-EE: unusable
    relay = dane.relay()
    qid = dane.world.submit(relay, ["bob@dane.test"])
    mx.wait_for_messages_blocking(1, timeout=15)
    [ev] = relay.wait_event("delivered", queue_id=qid)
    assert ev["tls"] in ("TLSv1.2", "TLSv1.3") and ev["verified"] is False and ev["policy"] == "dane"


@pytest.mark.parametrize("usage", [3, 1])
def test_dane_2_4_starttls_stripped_defers_never_plaintext(dane: DaneWorld, usage: int) -> None:
    mx = dane.mx("mx1.dane.test", "127.0.0.21", None)  # an attacker stripped STARTTLS
    dane.world.domain("dane.test", [(10, "mx1.dane.test")])
    dane.tlsa("mx1.dane.test", f"{usage} 1 1 " + "ab" * 32)
    relay = dane.relay()
    qid = dane.world.submit(relay, ["bob@dane.test"])
    [ev] = relay.wait_event("deferred", queue_id=qid)
    assert ev["status"] == "4.7.5" and "DANE" in ev["reply"]
    assert mx.messages == [] and not mx.saw("MAIL")


def test_dane_policy_probe_shows_dnssec_tlsa_match_and_governing_policy(dane: DaneWorld) -> None:
    good = dane.world.pki.leaf("mx1.dane.test", untrusted=True)
    dane.mx("mx1.dane.test", "127.0.0.21", good)
    dane.mx("mx2.dane.test", "127.0.0.22", dane.world.pki.leaf("mx2.dane.test"))
    dane.world.mx_host("mx.plain.test", "127.0.0.23")
    dane.world.domain("dane.test", [(10, "mx1.dane.test"), (20, "mx2.dane.test"), (30, "mx.plain.test")])
    dane.tlsa("mx1.dane.test", f"3 1 1 {spki_sha256(good)}")
    dane.tlsa("mx2.dane.test", f"3 1 1 {spki_sha256(good)}")  # mx2 presents another key
    config = write_config(dane.world.tmp, dane.config(), "probe.toml")
    out = run_cli(config, "policy", "dane.test", "--probe", "--json", timeout=60)
    rows = {r["mx"]: r for r in json.loads(out.stdout)["probe"]}
    one, two, plain = rows["mx1.dane.test"], rows["mx2.dane.test"], rows["mx.plain.test"]
    assert one["dnssec"] == {"mx": "secure", "address": "secure"} and one["dane"] == "authenticate"
    assert one["tlsa"] == [f"3 1 1 {spki_sha256(good).upper()}"] and one["tlsa_match"] is True
    assert one["policy"] == "dane" and one["cert_valid"] is False  # DANE, not PKIX, accepts it
    assert two["tlsa_match"] is False and "tlsa-invalid" in two["error"]
    assert plain["dnssec"]["address"] == "insecure" and plain["dane"].startswith("none")
    assert plain["policy"] == "none" and plain["tlsa"] == []
    text = run_cli(config, "policy", "dane.test", "--probe", timeout=60).stdout
    assert "tlsa_match=yes policy=dane" in text and "TLSA 3 1 1" in text


def test_dane_2_5_6_secure_cname_mx_uses_the_target_as_base_and_sni(dane: DaneWorld) -> None:
    leaf, inter = dane.ta_leaf("mail.hoster.dane.test")  # names only the CNAME target
    mx = dane.mx("mail.hoster.dane.test", "127.0.0.24", leaf)
    dane.zone.add("mx.dane.test", "CNAME", "mail.hoster.dane.test.")
    dane.world.domain("dane.test", [(10, "mx.dane.test")])
    dane.tlsa("mail.hoster.dane.test", f"2 0 1 {hashlib.sha256(inter).hexdigest()}")
    relay = dane.relay()
    qid = dane.world.submit(relay, ["bob@dane.test"])
    [msg] = mx.wait_for_messages_blocking(1, timeout=15)
    assert msg.sni == "mail.hoster.dane.test"  # DANE-6: the TLSA base domain, not the MX name
    [ev] = relay.wait_event("delivered", queue_id=qid)
    assert ev["policy"] == "dane" and ev["verified"] is True and ev["mx"] == "mx.dane.test"
    assert dane.world.dns.count(dane.owner("mx.dane.test"), "TLSA") == 0  # the target's RRset sufficed
