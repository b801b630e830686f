"""DKIM keys: load and check the configured ones, make new ones, read and write DNS key records.

Rule: a key that cannot sign is a configuration error naming `dkim.keys[i].key_file` (unreadable,
not a private key, the wrong type for `algorithm`, RSA under 1024 bits: RFC 8301 §3.2, DKIM-3);
`check-config` and `mta serve` both refuse it, so a server never starts with a key that fails
at the first message. A published record (DKIM-8) is `v=DKIM1; k=rsa|ed25519; p=<base64>`, its
TXT strings at most 255 octets each.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from mta.config import DkimConfig, DkimKeyConfig
from mta.errors import ConfigError

MIN_RSA_BITS = 1024  # RFC 8301 §3.2: verifiers MUST NOT accept less
PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


@dataclass(frozen=True)
class LoadedKey:
    """A configured key, ready to sign."""

    domain: str
    selector: str
    algorithm: str  # "rsa-sha256" | "ed25519-sha256"
    private: PrivateKey

    @property
    def key_type(self) -> str:
        return "rsa" if self.algorithm == "rsa-sha256" else "ed25519"

    def public_p(self) -> str:
        """The p= value of this key's DNS record."""
        return public_p(self.private)


def public_p(private: PrivateKey) -> str:
    """Base64 public key as DKIM wants it: RSA as SubjectPublicKeyInfo DER, Ed25519 raw 32 octets (RFC 8463 §4.2)."""
    if isinstance(private, ed25519.Ed25519PrivateKey):
        raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    else:
        raw = private.public_key().public_bytes(serialization.Encoding.DER,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(raw).decode("ascii")


def load_key(spec: DkimKeyConfig, where: str, source: str = "<config>") -> LoadedKey:
    """Read one key file; ConfigError (`source: where.key_file: why`) when it cannot sign."""
    def fail(why: str) -> ConfigError:
        return ConfigError(f"{source}: {where}.key_file: {spec.key_file}: {why}")

    try:
        pem = Path(spec.key_file).read_bytes()
    except OSError as exc:
        raise fail(f"cannot read ({exc.strerror or exc})") from None
    try:
        private = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        # TypeError: an encrypted key (we cannot ask for a passphrase); ValueError: not PEM/a key.
        encrypted = isinstance(exc, TypeError)
        why = "is encrypted (store it without a passphrase)" if encrypted else "is not a PEM private key"
        raise fail(why) from None
    if spec.algorithm == "rsa-sha256":
        if not isinstance(private, rsa.RSAPrivateKey):
            raise fail(f"is an {_kind(private)} key, but algorithm is rsa-sha256")
        if private.key_size < MIN_RSA_BITS:
            raise fail(f"RSA key of {private.key_size} bits is too short (RFC 8301: at least {MIN_RSA_BITS}, "
                       "2048 recommended)")
    elif not isinstance(private, ed25519.Ed25519PrivateKey):
        raise fail(f"is an {_kind(private)} key, but algorithm is ed25519-sha256")
    return LoadedKey(spec.domain.lower(), spec.selector, spec.algorithm, private)


def _kind(private: object) -> str:
    if isinstance(private, rsa.RSAPrivateKey):
        return "RSA"
    if isinstance(private, ed25519.Ed25519PrivateKey):
        return "Ed25519"
    return type(private).__name__.removeprefix("_").replace("PrivateKey", "") or "unknown"


def load_keys(cfg: DkimConfig, source: str = "<config>") -> tuple[LoadedKey, ...]:
    """Every configured key, loaded and checked (first bad one raises ConfigError)."""
    return tuple(load_key(spec, f"dkim.keys[{i}]", source) for i, spec in enumerate(cfg.keys))


def generate(algorithm: str, bits: int = 2048) -> PrivateKey:
    if algorithm == "ed25519-sha256":
        return ed25519.Ed25519PrivateKey.generate()
    if bits < MIN_RSA_BITS:
        raise ValueError(f"--bits {bits}: RSA keys need at least {MIN_RSA_BITS} bits (RFC 8301)")
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def private_pem(private: PrivateKey) -> bytes:
    return private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())


def record_value(private: PrivateKey) -> str:
    """The TXT record's text (one string, before splitting)."""
    kind = "ed25519" if isinstance(private, ed25519.Ed25519PrivateKey) else "rsa"
    return f"v=DKIM1; k={kind}; p={public_p(private)}"


def zone_line(domain: str, selector: str, value: str) -> str:
    """`S._domainkey.D. IN TXT "..." "..."`: character-strings of at most 255 octets (DKIM-8)."""
    chunks = [value[i : i + 255] for i in range(0, len(value), 255)] or [""]
    quoted = " ".join(f'"{c}"' for c in chunks)
    return f"{selector}._domainkey.{domain.rstrip('.')}. IN TXT {quoted}"


def parse_record(text: str) -> dict[str, str]:
    """Tag=value pairs of a key record (RFC 6376 §3.6.1); FWS inside values removed. ValueError if malformed."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        if not part.strip():
            continue
        name, eq, value = part.partition("=")
        name = name.strip()
        if not eq or not name:
            raise ValueError(f"malformed tag {part.strip()!r}")
        if name in tags:
            raise ValueError(f"duplicate tag {name}=")  # RFC 6376 §3.2: a duplicate makes the record invalid
        tags[name] = "".join(value.split())
    return tags


def record_matches(text: str, key: LoadedKey) -> tuple[bool, str]:
    """Does a published record carry `key`'s public half? (ok, why not)."""
    try:
        tags = parse_record(text)
    except ValueError as exc:
        return False, f"record is malformed: {exc}"
    if tags.get("v", "DKIM1") != "DKIM1":
        return False, f"v={tags['v']} is not DKIM1"
    if tags.get("k", "rsa") != key.key_type:
        return False, f"k={tags.get('k', 'rsa')} but the key is {key.key_type}"
    if not tags.get("p"):
        return False, "p= is empty (the key is revoked)"
    if tags["p"] != key.public_p():
        return False, "p= is a different public key"
    return True, ""
