"""MTA_* environment overrides for containers (issue 19): applied after the TOML, errors name the variable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mta import config
from mta.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
CONTAINER_CONFIG = ROOT / "deploy" / "container" / "config.toml"


def test_ctr_5_env_overrides_win_over_the_file(tmp_path: Path) -> None:
    p = tmp_path / "config.toml"
    p.write_text('hostname = "file.example"\n[submission]\nlisten = ["127.0.0.1:2525"]\nmax_recipients = 7\n'
                 '[delivery]\nrelayhost = "smart.example:25"\n')
    env = {"MTA_HOSTNAME": "env.example", "MTA_LISTEN": "127.0.0.1:2600, [::1]:2600",
           "MTA_RELAY_NETWORKS": "10.88.0.1/32,192.0.2.0/24", "MTA_RELAYHOST": "other.example:587",
           "MTA_RELAYHOST_TLS": "may", "MTA_NAMESERVERS": "127.0.0.53", "MTA_HTTP_LISTEN": "127.0.0.1:8125",
           "UNRELATED": "x"}
    cfg = config.load(p, env)
    assert cfg.hostname == "env.example"
    assert cfg.submission.listen == ("127.0.0.1:2600", "[::1]:2600")
    assert cfg.submission.relay_networks == ("10.88.0.1/32", "192.0.2.0/24")
    assert cfg.submission.max_recipients == 7  # keys without a variable keep the file's value
    assert cfg.delivery.relayhost == "other.example:587"
    assert cfg.delivery.relayhost_tls == "may"
    assert cfg.dns.nameservers == ("127.0.0.53",)
    assert cfg.http.listen == "127.0.0.1:8125"
    # Without an environment (what every other caller passes) the file alone counts.
    assert config.load(p).hostname == "file.example"


def test_ctr_5_empty_values_mean_empty(tmp_path: Path) -> None:
    p = tmp_path / "config.toml"
    p.write_text('[delivery]\nrelayhost = "smart.example:25"\n')
    cfg = config.load(p, {"MTA_RELAY_NETWORKS": "", "MTA_RELAYHOST": ""})
    assert cfg.submission.relay_networks == ()  # nobody relays without AUTH
    assert cfg.delivery.relayhost == ""


@pytest.mark.parametrize(
    ("var", "value", "message"),
    [
        ("MTA_RELAY_NETWORKS", "10.0.0.0/33", "submission.relay_networks[0]: '10.0.0.0/33' is not a network"),
        ("MTA_RELAY_NETWORKS", "127.0.0.1/32,everyone", "submission.relay_networks[1]: 'everyone' is not a network"),
        ("MTA_HOSTNAME", "bad host", "hostname: 'bad host' is not a host name"),
        ("MTA_LISTEN", "", "submission.listen: at least one listen address is required"),
        ("MTA_LISTEN", "localhost:25", "submission.listen[0]: 'localhost:25' is not an IP:port address"),
        ("MTA_RELAYHOST", "smart.example", "delivery.relayhost: 'smart.example' is not host:port"),
        ("MTA_RELAYHOST_TLS", "never", "delivery.relayhost_tls: 'never' must be \"verify\" or \"may\""),
        ("MTA_NAMESERVERS", "ns1.example", "dns.nameservers[0]: 'ns1.example' is not an IP address"),
    ],
)
def test_ctr_5_errors_name_the_variable(tmp_path: Path, var: str, value: str, message: str) -> None:
    p = tmp_path / "config.toml"
    p.write_text("")
    with pytest.raises(ConfigError) as info:
        config.load(p, {var: value})
    assert str(info.value) == f"${var}: {message}"


def test_ctr_5_env_does_not_hide_a_broken_file(tmp_path: Path) -> None:
    p = tmp_path / "config.toml"
    p.write_text("submission = 3\n")
    with pytest.raises(ConfigError, match=r"config.toml: submission: expected a table"):
        config.load(p, {"MTA_LISTEN": "127.0.0.1:2525"})


def test_ctr_5_every_variable_is_documented() -> None:
    example = (ROOT / "config.example.toml").read_text()
    readme = (ROOT / "README.md").read_text()
    lines: dict[str, str] = {}  # "section.key" -> its line in the example
    section = ""
    for line in example.splitlines():
        if line.startswith("["):
            section = line.split("]")[0].strip("[") + "."
        elif " = " in line and not line.startswith("#"):
            lines[f"{section}{line.split(' = ')[0]}"] = line
    for var, key in config.ENV_KEYS.items():
        assert var in lines[key], f"config.example.toml: {key} does not mention {var}"
        assert var in readme, f"README.md does not mention {var}"


def test_ctr_3_image_config_is_valid_and_loopback_only() -> None:
    cfg = config.load(CONTAINER_CONFIG)
    assert cfg.submission.listen == ("0.0.0.0:2525",)
    # Never an open relay out of the box: only the container's own loopback may relay without AUTH.
    assert all(net.is_loopback for net in cfg.submission.networks)
    assert cfg.queue.path == "/var/spool/mta"
    assert cfg.mta_sts.cache_path.startswith("/var/spool/mta/") and cfg.tlsrpt.db_path.startswith("/var/spool/mta/")
    assert cfg.http.listen == "0.0.0.0:8025"  # probes and scrapes reach it from outside the container


def test_ctr_5_check_config_uses_mta_config_and_names_the_overrides(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text("")
    env = {"PATH": "/usr/bin:/bin", "MTA_CONFIG": str(p), "MTA_RELAY_NETWORKS": "10.88.0.1/32"}
    ok = subprocess.run([sys.executable, "-m", "mta", "check-config"], env=env, capture_output=True, text=True,
                        timeout=20, cwd=ROOT)
    assert (ok.returncode, ok.stdout.strip()) == (0, f"{p}: ok (overridden by MTA_RELAY_NETWORKS)")
    bad = subprocess.run([sys.executable, "-m", "mta", "check-config"], env={**env, "MTA_HOSTNAME": "-"},
                         capture_output=True, text=True, timeout=20, cwd=ROOT)
    assert bad.returncode == 1
    assert bad.stderr.strip() == "mta: $MTA_HOSTNAME: hostname: '-' is not a host name"


def test_ctr_3_readme_published_port_setting_admits_the_gateway_alone() -> None:
    """The README's bridge-network line: the image refuses the gateway until its one address is listed."""
    import ipaddress

    from tests.container.podman import readme_command

    run = readme_command("podman", "run", having="-p")
    assert run[run.index("-p") + 1].startswith("127.0.0.1:")  # published on the host's loopback only
    [setting] = [w for w in run if w.startswith("MTA_RELAY_NETWORKS=")]
    image = config.load(CONTAINER_CONFIG)
    quick = config.load(CONTAINER_CONFIG, {"MTA_RELAY_NETWORKS": setting.split("=", 1)[1]})
    gateway = ipaddress.ip_address("10.88.0.1")  # podman's default bridge gateway
    assert not any(gateway in net for net in image.submission.networks)
    assert [net.num_addresses for net in quick.submission.networks] == [1]
    assert any(gateway in net for net in quick.submission.networks)
