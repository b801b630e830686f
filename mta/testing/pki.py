"""Test PKI: one trusted CA (trustme), one untrusted CA, and leaf certificates for host names.

Every certificate the test world presents comes from here. Leaves are written to a temp folder as
PEM files so a real `mta serve` process can be pointed at `ca_file`.
"""

from __future__ import annotations

import datetime
import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class Leaf:
    """A certificate chain and key on disk."""

    cert_path: Path
    key_path: Path

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(self.cert_path), str(self.key_path))
        return ctx


class TestPki:
    """A trusted CA plus an untrusted one; leaves are minted on demand into `folder`."""

    __test__ = False  # not a pytest class

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA()
        self.untrusted_ca = trustme.CA()
        self.ca_file = folder / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self._count = 0

    def _write(self, cert: trustme.LeafCert) -> Leaf:
        self._count += 1
        cert_path = self.folder / f"leaf{self._count}.pem"
        key_path = self.folder / f"leaf{self._count}.key"
        cert_path.write_bytes(b"".join(b.bytes() for b in cert.cert_chain_pems))
        cert.private_key_pem.write_to_path(str(key_path))
        return Leaf(cert_path, key_path)

    def leaf(self, *names: str, untrusted: bool = False, expired: bool = False) -> Leaf:
        """A leaf with SAN dNSNames `names` (wildcards allowed), optionally expired or untrusted."""
        ca = self.untrusted_ca if untrusted else self.ca
        if expired:
            now = datetime.datetime.now(datetime.UTC)
            return self._write(ca.issue_cert(*names, not_before=now - datetime.timedelta(days=30),
                                             not_after=now - datetime.timedelta(days=1)))
        return self._write(ca.issue_cert(*names))

    def cn_only_leaf(self, common_name: str) -> Leaf:
        """A leaf with the name only in the subject CN and no SAN at all (STS-78, ID-6)."""
        return self.custom_leaf(common_name, [])

    def custom_leaf(self, common_name: str, sans: list[str], eku: list[str] | None = None) -> Leaf:
        """A leaf from the trusted CA with a free-form CN and SAN dNSNames (none: no SAN extension);
        `eku`: dotted OIDs of an extendedKeyUsage extension (None: no such extension)."""
        key = ec.generate_private_key(ec.SECP256R1())
        ca_key = serialization.load_pem_private_key(self.ca.private_key_pem.bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate(self.ca.cert_pem.bytes())
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in sans]),
                                            critical=False)
        if eku is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage([x509.ObjectIdentifier(o) for o in eku]),
                                            critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
        self._count += 1
        cert_path = self.folder / f"leaf{self._count}.pem"
        key_path = self.folder / f"leaf{self._count}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return Leaf(cert_path, key_path)

    def client_context(self) -> ssl.SSLContext:
        """A verifying client context that trusts the test CA."""
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        return ctx
