"""AUTH users: a text file of `user:scrypt$N$r$p$salt$hash` lines (base64 salt and hash).

Passwords are never stored or logged in clear. Verification uses hashlib.scrypt and a
constant-time compare. `set_password` rewrites the file atomically (tmp + fsync + rename).
`load_users` checks every entry completely (cost parameters in range, base64 fields) so a broken
line stops the start with ConfigError instead of silently never matching, and so no entry can make
one verification run for minutes (huge N, r or p).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path

from mta.errors import ConfigError

_N, _R, _P = 2**14, 8, 1
_B64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")
_DIGITS = re.compile(r"[0-9]{1,8}")


def _entry_problem(stored: str) -> str | None:
    """Why a `scrypt$N$r$p$salt$hash` field is unusable, or None when it is fine."""
    parts = stored.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        return "expected user:scrypt$N$r$p$salt$hash"
    n, r, p, salt, digest = parts[1:]
    if not all(_DIGITS.fullmatch(x) for x in (n, r, p)):
        return "N, r and p must be numbers"
    # Bounds keep one check cheap: N a power of two up to 2^20, r up to 32, p up to 16.
    if not (1 < int(n) <= 2**20 and int(n) & (int(n) - 1) == 0 and 1 <= int(r) <= 32 and 1 <= int(p) <= 16):
        return "scrypt cost parameters out of range"
    try:
        if not (_B64.fullmatch(salt) and _B64.fullmatch(digest)) or not base64.b64decode(digest, validate=True):
            return "salt and hash must be base64"
        base64.b64decode(salt, validate=True)
    except binascii.Error:
        return "salt and hash must be base64"
    if 128 * int(r) * (int(n) + int(p) + 2) > 64 * 2**20:
        return "scrypt parameters need more than 64 MiB"
    return None


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_N, r=_R, p=_P, dklen=32)
    b64 = base64.b64encode
    return f"scrypt${_N}${_R}${_P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        got = hashlib.scrypt(
            password.encode("utf-8", "surrogateescape"), salt=base64.b64decode(salt), n=int(n), r=int(r),
            p=int(p), dklen=len(expected), maxmem=128 * 2**20,
        )
    except (ValueError, TypeError, UnicodeEncodeError, MemoryError):
        return False
    return hmac.compare_digest(got, expected)


def load_users(path: str) -> dict[str, str]:
    """user -> stored hash; raises ConfigError naming the line of a malformed entry."""
    users: dict[str, str] = {}
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read users file: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: users file is not UTF-8 (byte {exc.start})") from None
    # Lines end at \n only: str.splitlines() would also split at \x1c, \x85, \u2028 and friends.
    for lineno, line in enumerate(text.split("\n"), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, stored = line.partition(":")
        problem = "expected user:scrypt$..." if not sep or not user else _entry_problem(stored)
        if problem is None and any(not c.isprintable() or c.isspace() for c in user):
            problem = "user names may not contain whitespace or control characters"
        if problem:
            raise ConfigError(f"{path}:{lineno}: {problem} (use `mta passwd`)")
        users[user] = stored
    return users


def set_password(path: str, user: str, password: str) -> None:
    """Add or change a user, keeping the other lines."""
    if not user or ":" in user or any(c.isspace() for c in user):
        raise ValueError("user names may not contain ':' or whitespace")
    if not password:
        raise ValueError("empty password")
    p = Path(path)
    users = load_users(path) if p.exists() else {}
    users[user] = hash_password(password)
    tmp = p.with_name(p.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write("".join(f"{u}:{h}\n" for u, h in sorted(users.items())))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, p)
