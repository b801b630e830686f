"""Configuration loading: every error is one line naming the file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from mta import config
from mta.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def load_text(tmp_path: Path, text: str) -> config.Config:
    p = tmp_path / "config.toml"
    p.write_text(text)
    return config.load(p)


def test_example_config_loads_and_documents_every_key() -> None:
    cfg = config.load(ROOT / "config.example.toml")
    assert cfg.hostname == "relay.example.org"
    assert cfg.submission.listen == ("127.0.0.1:2525",)
    assert cfg.delivery.retry_intervals == (300, 600, 1800, 3600, 7200, 14400)
    assert cfg.queue.path == str(ROOT / "queue")
    text = (ROOT / "config.example.toml").read_text()
    import dataclasses

    for section in dataclasses.fields(config.Config):
        if section.name == "source" or not dataclasses.is_dataclass(getattr(cfg, section.name)):
            continue
        assert f"[{section.name}]" in text
        for f in dataclasses.fields(getattr(cfg, section.name)):
            assert f"\n{f.name} =" in text or f"[{section.name}.{f.name}]" in text, f"{section.name}.{f.name}"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[delivery]\nretry_intervals = ["5m", "1h", "5x"]', 'config.toml: delivery.retry_intervals[2]: "5x" is not a duration'),
        ("colour = 1", "config.toml: colour: unknown key"),
        ("[submission]\nlisten = 5", "config.toml: submission.listen: expected a list of strings, got 5"),
        ('[submission]\nmax_message_size = "big"', 'config.toml: submission.max_message_size: "big" is not a size'),
        ("[submission]\nmax_recipients = 0", "config.toml: submission.max_recipients: must be at least 1, got 0"),
        ('[submission]\nrelay_networks = ["10.0.0.0/33"]', "config.toml: submission.relay_networks[0]: '10.0.0.0/33' is not a network"),
        ('[submission]\nlisten = ["localhost"]', "config.toml: submission.listen[0]: 'localhost' is not an IP:port address"),
        ('[submission]\ntls_cert = "a.pem"', "config.toml: submission.tls_key: tls_cert and tls_key must be set together"),
        ("[delivery]\nsmtp_port = 70000", "config.toml: delivery.smtp_port: 70000 is not a port number"),
        ("[delivery]\nipv6 = 1", "config.toml: delivery.ipv6: expected true or false, got 1"),
        ('[delivery]\nrelayhost_tls = "sometimes"', "config.toml: delivery.relayhost_tls: 'sometimes' must be \"verify\" or \"may\""),
        ('[dns]\nnameservers = ["ns1"]', "config.toml: dns.nameservers[0]: 'ns1' is not an IP address"),
        ("[mta_sts]\nenabled = \"yes\"", "config.toml: mta_sts.enabled: expected true or false, got 'yes'"),
        ('[mta_sts.overrides]\n"a.example" = "off"', "config.toml: mta_sts.overrides.a.example: 'off' must be none or a policy text"),
        ('hostname = "bad host"', "config.toml: hostname: 'bad host' is not a host name"),
        ("[queue]\npath = 3", "config.toml: queue.path: expected a string, got int"),
        ("[tlsrpt]\nsend_hour_utc = 24", "config.toml: tlsrpt.send_hour_utc: 24 is not an hour 0-23"),
        ('[log]\nformat = "xml"', "config.toml: log.format: 'xml' must be \"text\" or \"json\""),
        ("[queue", "config.toml: invalid TOML"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_text(tmp_path, text)
    got = str(err.value).replace(str(tmp_path / "config.toml"), "config.toml")
    assert got.startswith(message)
    assert "\n" not in got


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(tmp_path / "nope.toml")


@pytest.mark.parametrize(("text", "seconds"), [("30s", 30), ("5m", 300), ("1h", 3600), ("5d", 432000), ("250ms", 0.25)])
def test_durations(text: str, seconds: float) -> None:
    assert config.parse_duration(text) == seconds


@pytest.mark.parametrize(("text", "size"), [("25MB", 25_000_000), ("512KB", 512_000), ("1MiB", 1048576), ("100", 100)])
def test_sizes(text: str, size: int) -> None:
    assert config.parse_size(text) == size


@pytest.mark.parametrize("text", ["", "5", "5x", "m5", "-1s", "1.5.2h"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        config.parse_duration(text)


def test_relative_paths_follow_the_config_file(tmp_path: Path) -> None:
    sub = tmp_path / "etc"
    sub.mkdir()
    cfg = load_text(sub, '[queue]\npath = "spool"\n[mta_sts]\ncache_path = "spool/sts.db"')
    assert cfg.queue.path == str(sub / "spool")
    assert cfg.mta_sts.cache_path == str(sub / "spool" / "sts.db")


def test_defaults_are_loopback_only() -> None:
    cfg = config.from_dict({})
    assert cfg.submission.relay_networks == ("127.0.0.0/8", "::1/128")
    assert cfg.submission.allow_insecure_auth is False


_TLSRPT_ON = '[tlsrpt]\nenabled = true\ncontact_info = "tlsrpt@reports.example.org"\nreport_sender = "r@example.org"\n'
_KEY = '[[dkim.keys]]\ndomain = "{domain}"\nselector = "s1"\nkey_file = "k.pem"\n'


@pytest.mark.parametrize(("text", "message"), [
    # RPT-18 (RFC 8460 §5.3, issue 10 item 13): report mails must be signed by the reporting domain.
    (_TLSRPT_ON, "config.toml: dkim.keys: no key signs for the TLS reporting domain 'reports.example.org' (tlsrpt.contact_info); RFC 8460 §5.3 requires report mails to be DKIM-signed: add a [[dkim.keys]] table for it"),
    (_TLSRPT_ON + _KEY.format(domain="other.org"), "config.toml: dkim.keys: no key signs for the TLS reporting domain 'reports.example.org' (tlsrpt.contact_info); RFC 8460 §5.3 requires report mails to be DKIM-signed: add a [[dkim.keys]] table for it"),
    ('[tlsrpt]\ndkim_selector = "rpt"', "config.toml: tlsrpt.dkim_selector: removed: report mails are signed with the [[dkim.keys]] keys (see [dkim])"),
    ('[tlsrpt]\ndkim_key_file = "k.pem"', "config.toml: tlsrpt.dkim_key_file: removed: report mails are signed with the [[dkim.keys]] keys (see [dkim])"),
    ("[dkim]\nenabled = true", "config.toml: dkim.keys: dkim.enabled is true but no [[dkim.keys]] table is configured"),
    ('[dkim]\nkeys = "x"', "config.toml: dkim.keys: expected an array of tables"),
    (_KEY.format(domain="exa mple.org"), "config.toml: dkim.keys[0].domain: 'exa mple.org' is not a domain name (A-labels)"),
    (_KEY.format(domain="example.org") + 'algorithm = "rsa-sha1"', 'config.toml: dkim.keys[0].algorithm: \'rsa-sha1\' must be "rsa-sha256" or "ed25519-sha256"'),
    (_KEY.format(domain="example.org") + "colour = 1", "config.toml: dkim.keys[0].colour: unknown key"),
    (_KEY.format(domain="example.org") * 2, "config.toml: dkim.keys[1].selector: s1._domainkey.example.org is configured twice"),
    ('[[dkim.keys]]\ndomain = "example.org"\nselector = "s1"', "config.toml: dkim.keys[0].key_file: a PEM private key file is required"),
    ('[dkim]\nheaders = ["From", "Bad Name"]', "config.toml: dkim.headers[1]: 'Bad Name' is not a header field name"),
])
def test_issue10_item13_rpt_18_dkim_config_errors_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_text(tmp_path, text)
    assert str(exc.value).replace(str(tmp_path / "config.toml"), "config.toml") == message


def test_rpt_18_tlsrpt_accepted_with_a_key_of_the_reporting_domain_or_a_parent(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, _TLSRPT_ON + _KEY.format(domain="example.org"))
    assert [(k.domain, k.selector, k.key_file, k.algorithm) for k in cfg.dkim.keys] == [
        ("example.org", "s1", str(tmp_path / "k.pem"), "rsa-sha256")]
    assert cfg.dkim.enabled is False and cfg.dkim.oversign == ("From", "Subject", "Date", "To", "Cc")
