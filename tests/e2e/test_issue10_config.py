"""Issue 10 item 9: what `mta check-config` accepts, `mta serve` starts with - and what serve
would refuse, check-config refuses first, with the same one line naming the key."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from mta.submission.auth import hash_password
from tests.support.dkim import make_key
from tests.support.pki import TestPki
from tests.support.relay import RelayProcess, base_config, deep_merge, dump_toml, free_port, run_cli

REPO = Path(__file__).resolve().parents[2]


def _example(tmp: Path) -> dict[str, Any]:
    """config.example.toml as shipped, with a free port and the spool in tmp."""
    data = tomllib.loads((REPO / "config.example.toml").read_text())
    return deep_merge(data, {"submission": {"listen": [f"127.0.0.1:{free_port()}"]},
                             "queue": {"path": str(tmp / "queue")},
                             "mta_sts": {"cache_path": str(tmp / "queue" / "sts.db")},
                             "tlsrpt": {"db_path": str(tmp / "queue" / "tlsrpt.db")},
                             "log": {"format": "json"}})  # so the test can wait for the "started" event


def _files(tmp: Path) -> dict[str, str]:
    pki = TestPki(tmp / "pki")
    leaf = pki.leaf("relay.test")
    (tmp / "secret").write_text("s3cret\n")
    (tmp / "users").write_text(f"alice:{hash_password('pw')}\n")
    dkim = make_key(tmp / "dkim", "relay.test", "s", "ed25519-sha256")
    return {"cert": str(leaf.cert_path), "key": str(leaf.key_path), "ca": str(pki.ca_file),
            "secret": str(tmp / "secret"), "users": str(tmp / "users"), "dkim": str(dkim.path)}


PINNED = "version: STSv1\nmode: enforce\nmx: mx.pinned.example\nmax_age: 86400\n"

# Each accepted configuration: a representative of every feature that reads files or binds.
ACCEPTED: dict[str, Any] = {
    "example": None,
    "smarthost-auth-may": lambda f: {"delivery": {"relayhost": "smarthost.test:587", "relayhost_tls": "may",
                                                  "relayhost_username": "u", "relayhost_password_file": f["secret"]}},
    "overrides": lambda f: {"mta_sts": {"enabled": True, "overrides": {"off.example": "none",
                                                                       "pinned.example": PINNED}}},
    "starttls-auth-users": lambda f: {"submission": {"tls_cert": f["cert"], "tls_key": f["key"],
                                                     "users_file": f["users"]}, "tls": {"ca_file": f["ca"]}},
    "tlsrpt-dkim": lambda f: {"tlsrpt": {"enabled": True, "contact_info": "t@relay.test",
                                         "report_sender": "r@relay.test"},
                              "dkim": {"keys": [{"domain": "relay.test", "selector": "s", "key_file": f["dkim"],
                                                 "algorithm": "ed25519-sha256"}]}},
    "bind-address-one-process": lambda f: {"delivery": {"bind_address": "127.0.0.77"},
                                           "submission": {"separate_process": False,
                                                          "max_connections_per_client": 5}},
}


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_issue10_item9_cfg_1_every_config_check_config_accepts_starts_serve(tmp_path: Path, case: str) -> None:
    files = _files(tmp_path)
    make = ACCEPTED[case]
    data = _example(tmp_path) if make is None else deep_merge(base_config(tmp_path), make(files))
    config = tmp_path / "config.toml"
    config.write_text(dump_toml(data) + "\n")
    checked = run_cli(config, "check-config")
    assert checked.returncode == 0, checked.stderr
    relay = RelayProcess(config, data).start()  # raises when nothing listens
    try:
        relay.wait_event("started")
        assert relay.stop() == 0, relay.log_text()
    finally:
        relay.kill()


REFUSED: dict[str, tuple[Any, str]] = {
    "override-short-enforce": ({"mta_sts": {"overrides": {"d.example": "enforce"}}},
                               "mta_sts.overrides.d.example: 'enforce' needs mx patterns"),
    "override-short-testing": ({"mta_sts": {"overrides": {"d.example": "testing"}}},
                               "mta_sts.overrides.d.example: 'testing' needs mx patterns"),
    "override-bad-policy": ({"mta_sts": {"overrides": {"d.example": "version: STSv1\nmode: sometimes\n"}}},
                            "mta_sts.overrides.d.example: invalid policy"),
    "missing-password-file": (lambda f: {"delivery": {"relayhost": "s.test:25", "relayhost_username": "u",
                                                      "relayhost_password_file": f["secret"] + ".missing"}},
                              "delivery.relayhost_password_file: cannot read"),
    "broken-users-file": (lambda f: {"submission": {"users_file": f["cert"]}}, "submission.users_file:"),
    "unusable-tls-cert": (lambda f: {"submission": {"tls_cert": f["users"], "tls_key": f["users"]}},
                          "submission.tls_cert: cannot load"),
    "unusable-dkim-key": (lambda f: {"dkim": {"keys": [{"domain": "relay.test", "selector": "s",
                                                        "key_file": f["users"]}]}}, "dkim.keys[0].key_file"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_issue10_item9_cfg_1_what_serve_refuses_check_config_refuses(tmp_path: Path, case: str) -> None:
    files = _files(tmp_path)
    extra, message = REFUSED[case]
    data = deep_merge(base_config(tmp_path), extra(files) if callable(extra) else extra)
    config = tmp_path / "config.toml"
    config.write_text(dump_toml(data) + "\n")
    checked = run_cli(config, "check-config")
    assert checked.returncode == 1 and message in checked.stderr, checked.stderr
    assert len(checked.stderr.strip().splitlines()) == 1  # one line naming the key
    served = run_cli(config, "serve", timeout=20)
    assert served.returncode == 1 and checked.stderr.strip() in served.stderr, served.stderr
