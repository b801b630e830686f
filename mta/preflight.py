"""Everything `mta serve` needs besides a valid config file, checked without side effects.

Rule (issue 10 item 9): `mta check-config` and `mta serve` run this same function, so a
configuration check-config accepts is one serve can start with: the files the config names
(relay host password, AUTH users, listener certificate, CA bundle, DKIM keys) are read and
parsed, and the outgoing bind addresses are bound once. Problems raise ConfigError naming the
key; `warnings` lists accepted-but-risky settings.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

from mta.config import Config
from mta.errors import ConfigError, MtaError


def _fail(cfg: Config, key: str, msg: str) -> None:
    raise ConfigError(f"{cfg.source}: {key}: {msg}")


def _read(cfg: Config, key: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        _fail(cfg, key, f"cannot read {path}: {exc.strerror or exc}")
    raise AssertionError  # pragma: no cover - _fail raised


def check(cfg: Config) -> None:
    """Raise ConfigError (one line naming the key) for anything serve would trip over."""
    from mta.submission.auth import load_users
    from mta.submission.listener import server_tls_context

    d = cfg.delivery
    if d.relayhost_password_file and not _read(cfg, "delivery.relayhost_password_file",
                                               d.relayhost_password_file).strip():
        _fail(cfg, "delivery.relayhost_password_file", "the file is empty")
    sub = cfg.submission
    if sub.processes > 1 and not hasattr(socket, "SO_REUSEPORT"):
        _fail(cfg, "submission.processes", "more than 1 needs SO_REUSEPORT, which this system lacks")
    if sub.users_file:
        try:
            load_users(sub.users_file)
        except MtaError as exc:
            _fail(cfg, "submission.users_file", str(exc))
    if sub.tls_cert:
        try:
            server_tls_context(sub.tls_cert, sub.tls_key)
        except (OSError, ssl.SSLError) as exc:
            _fail(cfg, "submission.tls_cert", f"cannot load {sub.tls_cert} / {sub.tls_key}: {exc}")
    if cfg.tls.ca_file:
        try:
            ssl.create_default_context(cafile=cfg.tls.ca_file)
        except (OSError, ssl.SSLError) as exc:
            _fail(cfg, "tls.ca_file", f"cannot load {cfg.tls.ca_file}: {exc}")
    from mta.dkim.keys import load_keys

    load_keys(cfg.dkim, cfg.source)  # unreadable, wrong-type or too short DKIM keys (DKIM-3)
    for key, address, family in (("delivery.bind_address", d.bind_address, socket.AF_INET),
                                 ("delivery.bind_address6", d.bind_address6, socket.AF_INET6)):
        if address:
            # The address must be one of this host's: otherwise every delivery would fail later.
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind((address, 0))
                except OSError as exc:
                    _fail(cfg, key, f"cannot bind {address}: {exc.strerror or exc}")


def warnings(cfg: Config) -> list[str]:
    """Accepted but risky settings: check-config prints them, serve logs them at start."""
    out = []
    d = cfg.delivery
    if d.relayhost and d.relayhost_username and d.relayhost_tls == "may":
        # Issue 10 item 6 decision: a warning, not an error - credentials still never travel
        # in plaintext (the session defers instead), but an unverified certificate lets an
        # active attacker pose as the smart host and collect them.
        out.append(f"{cfg.source}: delivery.relayhost_tls: \"may\" with relayhost_username sends the "
                   "password to any host that answers with TLS (certificate not verified); plaintext "
                   "sessions defer instead; use \"verify\"")
    from mta.dane.trust import resolver_warnings  # DANE: a resolver whose AD bit cannot be trusted

    out.extend(f"{cfg.source}: {w}" for w in resolver_warnings(cfg))
    return out
