"""AUTH users: a text file of `user:scrypt$N$r$p$salt$hash` lines (base64 salt and hash).

Passwords are never stored or logged in clear. Verification uses hashlib.scrypt and a
constant-time compare. `set_password` rewrites the file atomically (tmp + fsync + rename).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from pathlib import Path

from mta.errors import ConfigError

_N, _R, _P = 2**14, 8, 1


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
            password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p), dklen=len(expected)
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, expected)


def load_users(path: str) -> dict[str, str]:
    """user -> stored hash; raises ConfigError naming the line of a malformed entry."""
    users: dict[str, str] = {}
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read users file: {exc.strerror}") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, stored = line.partition(":")
        if not sep or not user or not stored.startswith("scrypt$") or stored.count("$") != 5:
            raise ConfigError(f"{path}:{lineno}: expected user:scrypt$... (use `mta passwd`)")
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
