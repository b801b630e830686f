"""DKIM signatures verified by dkimpy (an independent implementation) against keys published in the
real fake DNS server on loopback; key checks of check-config; `mta dkim keygen` and `mta dkim check`."""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

import mta.config
from mta.dkim.signer import Signer
from tests.support.dkim import DkimTestKey, make_key, verify_all
from tests.support.fake_dns import FakeDns, Zone
from tests.support.relay import base_config, deep_merge, run_cli, write_config

NOW = 1_796_000_000.0
# A 768-bit RSA key (cryptography refuses to make one; made once with `openssl genpkey`), for DKIM-3.
SHORT_RSA = b"""-----BEGIN PRIVATE KEY-----
MIIB5gIBADANBgkqhkiG9w0BAQEFAASCAdAwggHMAgEAAmEAz+BRftE0fEs8DLA6
dCUzZTMocaI41dyTTjJ1GBEkAGbKPLv4+UaZbR5bXS06yO5aj7ZVCzIlar2AaiGW
z6+Ft399ycQ96JsGgawxALMt2O6kExsXva4CU/MwXNe7DVhZAgMBAAECYA5KFDAM
f3gfz9PrdUkwmXTWbGxLQ27oB7QzYbsyym/AoRxFq5qvELLgiFVCW60ePTmmDJP8
8YtD4vNmAkvV7VY5V650FuFAWb4uobXfQzY9cZS269UDmQtVHgA26kP+RQIxAPXv
QQhQyF8IqQFVUzjfSnpMLS6FSd1zCniFJHtfWeiD72m+/GhVS0PUT0PVB6EY8wIx
ANhiUDAG863OSX/QixWxTvLyifSIPVRVrDjdaKneMZ3BQvG6Ldy85UQp8P10cFEc
gwIxANQWCOon6DP0XvLUZ1mDTlIbQVd+AI4luGDoyOZP+1QF+0AhQMCk1axf+h9Q
Ji0qOwIxAKjETTyYP3ig+0x4L/KUXzo3lwelNwhO5ctYTOioR1R+RqNYjaqrnbmD
aNWV+oAY1wIxAJWBPSQ6CVdcU97CDjo8a2bn7RhGz5xoAs1ysYKfAfPLeBk6ksox
EzSCVCZXgyYERw==
-----END PRIVATE KEY-----
"""


@pytest.fixture(scope="module")
def dns_server() -> Iterator[FakeDns]:
    with FakeDns(Zone(), host="127.0.0.53") as running:
        yield running


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory, dns_server: FakeDns) -> dict[str, DkimTestKey]:
    folder = tmp_path_factory.mktemp("keys")
    out = {"rsa": make_key(folder, "example.org", "r2026"),
           "ed": make_key(folder, "example.org", "e2026", "ed25519-sha256"),
           "sub": make_key(folder, "mail.example.org", "s1", "ed25519-sha256")}
    for key in out.values():
        key.publish(dns_server.zone)
    return out


def signer_for(*keys: DkimTestKey, **dkim: Any) -> Signer:
    data = {"dkim": {"enabled": True, "keys": [k.config() for k in keys], **dkim}}
    return Signer.from_config(mta.config.from_dict(data, "test.toml"))


MESSAGES = {
    "plain": b"From: a@example.org\r\nTo: b@dst.test\r\nSubject: hi\r\n\r\nhello\r\n",
    "8-bit body": ("From: Jörg <j@example.org>\r\nTo: b@dst.test\r\nSubject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n"
                   "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
                   "Grüße aus Köln,   mit  Leerzeichen \t\r\n\r\n\r\n").encode(),
    "long folded headers": (b"From: a@example.org\r\nTo: " + b",\r\n\t".join(b"user%d@dst.test" % i for i in range(40))
                            + b"\r\nSubject:   a  subject\r\n  folded\t over\r\n\tthree lines  \r\nX-Long: "
                            + b"x" * 900 + b"\r\nReferences: " + b" ".join(b"<id%d@x>" % i for i in range(60))
                            + b"\r\n\r\n" + b"line\r\n" * 500),
    "no body": b"From: a@example.org\r\nSubject: empty\r\n\r\n",
    "subdomain": b"From: a@news.example.org\r\nSubject: x\r\n\r\nbody\r\n",
}


@pytest.mark.parametrize("name", sorted(MESSAGES))
@pytest.mark.parametrize("which", ["rsa", "ed"])
def test_dkim_2_3_4_6_signature_verifies_with_dkimpy(name: str, which: str, published: dict[str, DkimTestKey],
                                                     dns_server: FakeDns) -> None:
    signed = signer_for(published[which]).sign_submission(MESSAGES[name], NOW)
    assert signed.note == f"example.org/{published[which].selector}"
    assert signed.data.startswith(b"DKIM-Signature: v=1; a=" + published[which].algorithm.encode())
    assert signed.data.endswith(MESSAGES[name])  # signature first, the message untouched (DKIM-7)
    assert verify_all(signed.data, dns_server) == [True]
    field = signed.data.split(b"\r\n\r\n")[0].split(b"\r\nFrom:")[0].decode()
    assert "c=relaxed/relaxed;" in field and f"t={int(NOW)};" in field and " l=" not in field  # DKIM-2, DKIM-6
    assert all(len(line) <= 78 for line in field.split("\r\n"))


def test_dkim_4_dual_signature_and_the_most_specific_domain(published: dict[str, DkimTestKey],
                                                            dns_server: FakeDns) -> None:
    signer = signer_for(published["rsa"], published["ed"], published["sub"])
    both = signer.sign_submission(MESSAGES["plain"], NOW)
    assert both.note == "example.org/r2026 example.org/e2026" and verify_all(both.data, dns_server) == [True, True]
    sub = signer.sign_submission(b"From: a@x.mail.example.org\r\n\r\nbody\r\n", NOW)
    assert sub.note == "mail.example.org/s1" and b"d=mail.example.org;" in sub.data
    assert verify_all(sub.data, dns_server) == [True]


@pytest.mark.parametrize("change", [
    pytest.param(lambda m: m.replace(b"hello", b"Hello"), id="body"),
    pytest.param(lambda m: m.replace(b"Subject: hi", b"Subject: hI"), id="subject"),
    pytest.param(lambda m: m.replace(b"\r\n\r\n", b"\r\nSubject: second\r\n\r\n", 1), id="oversigned-added"),
    pytest.param(lambda m: m.replace(b"\r\n\r\n", b"\r\nCc: extra@x.test\r\n\r\n", 1), id="absent-oversigned"),
    pytest.param(lambda m: m + b"appended\r\n", id="appended (no l=)"),
])
@pytest.mark.parametrize("which", ["rsa", "ed"])
def test_dkim_1_altered_after_signing_fails_verification(change: Any, which: str, published: dict[str, DkimTestKey],
                                                         dns_server: FakeDns) -> None:
    signed = signer_for(published[which]).sign_submission(MESSAGES["plain"], NOW)
    assert verify_all(signed.data, dns_server) == [True]
    assert verify_all(change(signed.data), dns_server) == [False]


def test_whitespace_changes_survive_relaxed(published: dict[str, DkimTestKey], dns_server: FakeDns) -> None:
    """What relaxed/relaxed is for: a hop that refolds headers or trims trailing spaces keeps it valid."""
    signed = signer_for(published["rsa"]).sign_submission(MESSAGES["8-bit body"], NOW)
    rewrapped = signed.data.replace(b"Subject: =?utf", b"Subject:\r\n =?utf").replace(b"Leerzeichen \t", b"Leerzeichen")
    assert verify_all(rewrapped, dns_server) == [True]


@pytest.mark.parametrize(("message", "note"), [
    (b"To: b@dst.test\r\n\r\nbody\r\n", "unsigned: no From: field"),
    (b"From: a@example.org, c@example.org\r\n\r\nbody\r\n", "unsigned: several From: addresses"),
    (b"From: a@example.org\r\nFrom: c@example.org\r\n\r\nbody\r\n", "unsigned: several From: fields"),
    (b"From: a@elsewhere.test\r\n\r\nbody\r\n", "unsigned: no key for elsewhere.test"),
])
def test_dkim_5_unsigned_mail_says_why(message: bytes, note: str, published: dict[str, DkimTestKey]) -> None:
    signed = signer_for(published["rsa"]).sign_submission(message, NOW)
    assert signed.data == message and signed.note == note


def test_dkim_disabled_signs_nothing(published: dict[str, DkimTestKey]) -> None:
    cfg = mta.config.from_dict({"dkim": {"keys": [published["rsa"].config()]}}, "test.toml")
    assert Signer.from_config(cfg).sign_submission(MESSAGES["plain"], NOW).data == MESSAGES["plain"]


def _pem(key: Any) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@pytest.mark.parametrize(("content", "algorithm", "error"), [
    (None, "rsa-sha256", "cannot read (No such file or directory)"),
    (b"not a key", "rsa-sha256", "is not a PEM private key"),
    ("ed", "rsa-sha256", "is an Ed25519 key, but algorithm is rsa-sha256"),
    ("rsa", "ed25519-sha256", "is an RSA key, but algorithm is ed25519-sha256"),
    ("ec", "rsa-sha256", "is an EC key, but algorithm is rsa-sha256"),
    ("short", "rsa-sha256", "RSA key of 768 bits is too short (RFC 8301: at least 1024, 2048 recommended)"),
    ("encrypted", "rsa-sha256", "is encrypted (store it without a passphrase)"),
])
def test_dkim_3_check_config_names_a_key_that_cannot_sign(tmp_path: Path, content: Any, algorithm: str,
                                                          error: str, published: dict[str, DkimTestKey]) -> None:
    path = tmp_path / "key.pem"
    sources = {"ed": published["ed"].path.read_bytes(), "rsa": published["rsa"].path.read_bytes(),
               "ec": _pem(ec.generate_private_key(ec.SECP256R1()))}
    if content == "short":
        content = SHORT_RSA
    elif content == "encrypted":
        content = rsa.generate_private_key(public_exponent=65537, key_size=1024).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"))
    if content is not None:
        path.write_bytes(sources.get(content, content) if isinstance(content, str) else content)
    data = deep_merge(base_config(tmp_path), {"dkim": {"keys": [
        published["rsa"].config(),
        {"domain": "x.test", "selector": "s", "key_file": str(path), "algorithm": algorithm}]}})
    config = write_config(tmp_path, data)
    for command in ("check-config", "serve"):  # what check-config refuses, serve refuses too
        out = run_cli(config, command)
        assert out.returncode == 1
        assert out.stderr.strip() == f"mta: {config}: dkim.keys[1].key_file: {path}: {error}"


def test_dkim_8_keygen_writes_a_private_key_and_prints_the_record(tmp_path: Path, dns_server: FakeDns) -> None:
    out_file = tmp_path / "k.pem"
    out = run_cli(None, "dkim", "keygen", "--domain", "example.net", "--selector", "mta2026", "--out", str(out_file))
    assert out.returncode == 0, out.stderr
    assert stat.S_IMODE(os.stat(out_file).st_mode) == 0o600
    line = out.stdout.strip()
    assert line.startswith('mta2026._domainkey.example.net. IN TXT "v=DKIM1; k=rsa; p=')
    assert all(len(s) <= 255 for s in line.split(" IN TXT ", 1)[1].strip('"').split('" "'))
    again = run_cli(None, "dkim", "keygen", "--domain", "example.net", "--selector", "x", "--out", str(out_file))
    assert again.returncode == 1 and "File exists" in again.stderr  # never replaces a key
    ed = run_cli(None, "dkim", "keygen", "--domain", "example.net", "--selector", "e", "--algorithm",
                 "ed25519-sha256", "--out", str(tmp_path / "e.pem"))
    assert ed.returncode == 0 and '"v=DKIM1; k=ed25519; p=' in ed.stdout and len(ed.stdout) < 120


def test_dkim_check_against_the_published_records(tmp_path: Path, dns_server: FakeDns,
                                                  published: dict[str, DkimTestKey]) -> None:
    unpublished = make_key(tmp_path / "k", "example.org", "unpublished")
    wrong = make_key(tmp_path / "k", "example.org", "wrong")
    dns_server.zone.add("wrong._domainkey.example.org", "TXT", f'"{published["ed"].record}"')
    data = deep_merge(base_config(tmp_path), {
        "dns": {"nameservers": [dns_server.host], "port": dns_server.port},
        "dkim": {"keys": [published["rsa"].config(), published["ed"].config(), unpublished.config(), wrong.config()]}})
    config = write_config(tmp_path, data)
    ok = run_cli(config, "dkim", "check", "--domain", "example.org", "--selector", "r2026")
    assert ok.returncode == 0 and ok.stdout.strip() == (
        "r2026._domainkey.example.org (dkim.keys[0], rsa-sha256): ok: the record carries this key")
    every = run_cli(config, "dkim", "check")
    assert every.returncode == 1, every.stdout
    lines = every.stdout.strip().splitlines()
    assert lines[1].endswith("(dkim.keys[1], ed25519-sha256): ok: the record carries this key")
    assert lines[2].endswith("PROBLEM: no DKIM key record published")
    assert lines[3].endswith("PROBLEM: k=ed25519 but the key is rsa")
    # A key whose record is missing never stops mail: the configuration is still fine.
    assert run_cli(config, "check-config").returncode == 0
    started = time.monotonic()
    assert run_cli(config, "dkim", "check", "--selector", "nope").returncode == 1
    assert time.monotonic() - started < 15
