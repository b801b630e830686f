"""`[dns] dnssec` and `[dane] enabled` (DANE-1): keys, defaults, errors, and check-config's resolver warning."""

from __future__ import annotations

from pathlib import Path

import pytest

from mta.config import ConfigError, from_dict
from mta.dane.trust import dnssec_warnings
from tests.support.relay import run_cli


def test_dane_keys_defaults() -> None:
    cfg = from_dict({})
    assert cfg.dns.dnssec is False and cfg.dane.enabled is True


def test_dane_keys_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"dns\.dnssec"):
        from_dict({"dns": {"dnssec": "yes"}})
    with pytest.raises(ConfigError, match=r"dane\.enabeld"):
        from_dict({"dane": {"enabeld": True}})


@pytest.mark.parametrize(("dnssec", "configured", "system", "warned"), [
    (False, ["192.0.2.1"], [], []),
    (True, ["127.0.0.1"], [], []),
    (True, ["::1"], [], []),
    (True, ["127.0.0.53", "192.0.2.1"], [], ["192.0.2.1"]),
    (True, [], ["127.0.0.53"], []),                      # system resolver read from resolv.conf
    (True, [], ["10.0.0.1", "fe80::1%eth0"], ["10.0.0.1", "fe80::1%eth0"]),
])
def test_dane_1_dnssec_warns_about_non_loopback_resolvers(dnssec: bool, configured: list[str], system: list[str],
                                                          warned: list[str]) -> None:
    cfg = from_dict({"dns": {"dnssec": dnssec, "nameservers": configured}})
    out = dnssec_warnings(cfg, system)
    assert len(out) == len(warned) and all(ns in w for ns, w in zip(warned, out, strict=True))


def test_dane_1_dnssec_without_any_nameserver_is_warned() -> None:
    assert "no nameserver" in dnssec_warnings(from_dict({"dns": {"dnssec": True}}), [])[0]


def test_dane_1_check_config_prints_the_warning_and_still_succeeds(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[dns]\ndnssec = true\nnameservers = ["192.0.2.1"]\n[queue]\npath = "q"\n')
    out = run_cli(cfg, "check-config")
    assert out.returncode == 0 and "ok" in out.stdout
    assert "warning:" in out.stderr and "dns.dnssec: nameserver 192.0.2.1" in out.stderr and "loopback" in out.stderr
