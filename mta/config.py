"""Configuration: TOML (tomllib) into frozen dataclasses, validated once at start.

Rule: every problem stops the program with ONE line naming the file and the key path, e.g.
`config.toml: delivery.retry_intervals[2]: "5x" is not a duration`. Unknown keys are errors too
(a typo must never silently fall back to a default). Relative paths are resolved against the
folder of the config file, so `mta serve --config /etc/mta/config.toml` works from any cwd.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mta.errors import ConfigError, MtaError

# ASCII digits only (`\d` would also take "٣٠s"), and \Z rather than $ (which allows a final "\n").
_DURATION = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)\Z")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE = re.compile(r"^([0-9]+)\s*(B|KB|MB|GB|KiB|MiB|GiB)?\Z", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "kib": 1024, "mib": 1024**2, "gib": 1024**3}


def parse_duration(text: str) -> float:
    """"30s" -> 30.0; raises ValueError. Units: ms, s, m, h, d."""
    m = _DURATION.match(text.strip())
    value = float(m.group(1)) * _DURATION_UNITS[m.group(2)] if m else math.nan
    if not math.isfinite(value):
        # float() turns 400 nines into inf instead of failing; an infinite timeout is not a duration.
        raise ValueError(f"\"{text}\" is not a duration (use e.g. 30s, 5m, 1h, 5d)")
    return value


def parse_size(text: str) -> int:
    """"25MB" -> 25000000; raises ValueError. Units: B, KB, MB, GB (SI) and KiB, MiB, GiB."""
    m = _SIZE.match(text.strip())
    if not m:
        raise ValueError(f"\"{text}\" is not a size (use e.g. 512KB, 25MB)")
    return int(m.group(1)) * _SIZE_UNITS[(m.group(2) or "b").lower()]


def parse_hostport(text: str) -> tuple[str, int]:
    """"127.0.0.1:2525" or "[::1]:2525" -> (host, port); raises ValueError."""
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:([0-9]{1,5})", text) or re.fullmatch(r"([^:\[\]\s]+):([0-9]{1,5})", text)
    if not m or not 0 <= int(m.group(2)) < 65536:
        raise ValueError(f"{text!r} is not host:port")
    return m.group(1), int(m.group(2))


def _meta(kind: str) -> dict[str, str]:
    """Field metadata selecting a converter beyond plain TOML types."""
    return {"kind": kind}


@dataclass(frozen=True)
class SubmissionConfig:
    listen: tuple[str, ...] = ("127.0.0.1:2525",)
    implicit_tls_listen: tuple[str, ...] = ()
    relay_networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    max_message_size: int = field(default=25_000_000, metadata=_meta("size"))
    max_recipients: int = 1000
    max_connections: int = 200
    max_connections_per_client: int = 50  # issue 10 item 14: one address cannot take every slot
    idle_timeout: float = field(default=300.0, metadata=_meta("duration"))
    # Above 80% of max_connections idle clients get this shorter timeout (Postfix's stress mode).
    stress_idle_timeout: float = field(default=10.0, metadata=_meta("duration"))
    tls_cert: str = field(default="", metadata=_meta("path"))
    tls_key: str = field(default="", metadata=_meta("path"))
    users_file: str = field(default="", metadata=_meta("path"))
    allow_insecure_auth: bool = False
    auth_failure_delay: float = field(default=2.0, metadata=_meta("duration"))
    separate_process: bool = True

    @property
    def networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(n, strict=False) for n in self.relay_networks]


@dataclass(frozen=True)
class QueueConfig:
    path: str = field(default="queue", metadata=_meta("path"))


@dataclass(frozen=True)
class DeliveryConfig:
    smtp_port: int = 25
    retry_intervals: tuple[float, ...] = field(
        default=(300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0), metadata=_meta("durations")
    )
    max_queue_lifetime: float = field(default=5 * 86400.0, metadata=_meta("duration"))
    bounce_lifetime: float = field(default=2 * 86400.0, metadata=_meta("duration"))
    delay_warning: float = field(default=0.0, metadata=_meta("duration"))
    concurrency: int = 50
    per_domain_concurrency: int = 20
    ipv6: bool = True
    connect_timeout: float = field(default=30.0, metadata=_meta("duration"))
    command_timeout: float = field(default=300.0, metadata=_meta("duration"))
    data_timeout: float = field(default=600.0, metadata=_meta("duration"))
    connection_reuse_time: float = field(default=5.0, metadata=_meta("duration"))
    unreachable_time: float = field(default=300.0, metadata=_meta("duration"))  # SMTP-37; 0s = off
    attempt_timeout: float = field(default=900.0, metadata=_meta("duration"))  # DLV-1
    relayhost: str = ""
    relayhost_tls: str = "verify"
    relayhost_username: str = ""
    relayhost_password_file: str = field(default="", metadata=_meta("path"))
    bind_address: str = ""  # local IPv4 address of outgoing SMTP connections; "" = the kernel's choice
    bind_address6: str = ""  # the same for IPv6


@dataclass(frozen=True)
class DnsConfig:
    nameservers: tuple[str, ...] = ()
    port: int = 53
    timeout: float = field(default=5.0, metadata=_meta("duration"))
    dnssec: bool = False  # the nameservers validate DNSSEC and their AD bit is trusted (DANE-1)


@dataclass(frozen=True)
class DaneConfig:
    enabled: bool = True  # effective only with dns.dnssec = true (RFC 7672)


@dataclass(frozen=True)
class TlsConfig:
    ca_file: str = field(default="", metadata=_meta("path"))


@dataclass(frozen=True)
class MtaStsConfig:
    enabled: bool = True
    https_port: int = 443
    cache_path: str = field(default="queue/sts-cache.db", metadata=_meta("path"))
    fetch_timeout: float = field(default=60.0, metadata=_meta("duration"))
    refresh_interval: float = field(default=3600.0, metadata=_meta("duration"))
    draft03_compat: bool = False
    overrides: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TlsRptConfig:
    enabled: bool = False
    organization_name: str = ""
    contact_info: str = ""
    report_sender: str = ""
    send_hour_utc: int = 0
    max_random_delay: float = field(default=4 * 3600.0, metadata=_meta("duration"))
    record_all_sessions: bool = False
    db_path: str = field(default="queue/tlsrpt.db", metadata=_meta("path"))


DKIM_ALGORITHMS = ("rsa-sha256", "ed25519-sha256")


@dataclass(frozen=True)
class DkimKeyConfig:
    """One `[[dkim.keys]]` table: signs mail whose From: domain is `domain` or below it."""

    domain: str = ""
    selector: str = ""
    key_file: str = field(default="", metadata=_meta("path"))
    algorithm: str = "rsa-sha256"


@dataclass(frozen=True)
class DkimConfig:
    enabled: bool = False
    headers: tuple[str, ...] = ("From", "To", "Cc", "Subject", "Date", "Message-ID", "Reply-To", "In-Reply-To",
                                "References", "MIME-Version", "Content-Type", "Content-Transfer-Encoding")
    oversign: tuple[str, ...] = ("From", "Subject", "Date", "To", "Cc")
    keys: tuple[DkimKeyConfig, ...] = ()


@dataclass(frozen=True)
class HttpConfig:
    listen: str = ""  # host:port of the operations endpoint (metrics, health, queue API); empty = off
    admin_token: str = ""  # Bearer token for /api; required off loopback, and enforced whenever set


@dataclass(frozen=True)
class LogConfig:
    format: str = "text"
    level: str = "info"


@dataclass(frozen=True)
class Config:
    hostname: str = "localhost"
    submission: SubmissionConfig = field(default_factory=SubmissionConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    dane: DaneConfig = field(default_factory=DaneConfig)
    mta_sts: MtaStsConfig = field(default_factory=MtaStsConfig)
    tlsrpt: TlsRptConfig = field(default_factory=TlsRptConfig)
    dkim: DkimConfig = field(default_factory=DkimConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    log: LogConfig = field(default_factory=LogConfig)
    source: str = field(default="<defaults>", metadata=_meta("internal"))


def _one_line(text: str) -> str:
    """Escape control characters so a hostile key or value cannot break the one-line rule."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _fail(src: str, key: str, msg: str) -> typing.NoReturn:
    raise ConfigError(_one_line(f"{src}: {key}: {msg}"))


def _convert(src: str, key: str, value: Any, f: dataclasses.Field[Any], hint: Any, base: Path) -> Any:
    kind = f.metadata.get("kind")
    if kind in ("duration", "size", "path"):
        if not isinstance(value, str):
            _fail(src, key, f"expected a string, got {type(value).__name__}")
        if kind == "path":
            try:
                return "" if value == "" else str((base / value).resolve())
            except (ValueError, OSError) as exc:  # e.g. an embedded NUL ("\u0000" in TOML)
                _fail(src, key, f"{value!r} is not a usable path ({exc})")
        try:
            return parse_duration(value) if kind == "duration" else parse_size(value)
        except ValueError as exc:
            _fail(src, key, str(exc).split(" (")[0])
    if kind == "durations":
        if not isinstance(value, list) or not value:
            _fail(src, key, "expected a non-empty list of durations")
        out = []
        for i, item in enumerate(value):
            try:
                if not isinstance(item, str):
                    raise ValueError(f"{item!r} is not a duration (")
                out.append(parse_duration(item))
            except ValueError as exc:
                _fail(src, f"{key}[{i}]", str(exc).split(" (")[0])
        return tuple(out)
    if hint is bool:
        if not isinstance(value, bool):
            _fail(src, key, f"expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(src, key, f"expected an integer, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            _fail(src, key, f"expected a string, got {value!r}")
        return value
    if typing.get_origin(hint) is tuple and dataclasses.is_dataclass(typing.get_args(hint)[0]):
        # An array of tables ([[dkim.keys]]): each entry is built and checked like a section.
        if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
            _fail(src, key, "expected an array of tables")
        return tuple(_build(typing.get_args(hint)[0], item, src, f"{key}[{i}].", base) for i, item in enumerate(value))
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, list):
            _fail(src, key, f"expected a list of strings, got {value!r}")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                _fail(src, f"{key}[{i}]", f"expected a string, got {item!r}")
        return tuple(value)
    if typing.get_origin(hint) is dict:
        if not isinstance(value, dict):
            _fail(src, key, "expected a table")
        for k, v in value.items():
            if not isinstance(v, str):
                _fail(src, f"{key}.{k}", f"expected a string, got {v!r}")
        return dict(value)
    _fail(src, key, "unsupported setting")  # pragma: no cover - schema bug


# Keys that existed once: say what replaced them instead of a bare "unknown key".
_REMOVED = {
    "tlsrpt.dkim_selector": "removed: report mails are signed with the [[dkim.keys]] keys (see [dkim])",
    "tlsrpt.dkim_key_file": "removed: report mails are signed with the [[dkim.keys]] keys (see [dkim])",
}


def _build(cls: type, data: dict[str, Any], src: str, prefix: str, base: Path) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("kind") != "internal"}
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in known:
            _fail(src, key, _REMOVED.get(key, "unknown key"))
        f = known[name]
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                _fail(src, key, "expected a table")
            kwargs[name] = _build(hint, value, src, f"{key}.", base)  # type: ignore[arg-type]
            continue
        kwargs[name] = _convert(src, key, value, f, hint, base)
    for name, f in known.items():
        if name in kwargs:
            continue
        # Defaults that are paths are resolved against the config folder as well.
        if dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], {}, src, f"{prefix}{name}.", base)  # type: ignore[arg-type]
        elif f.metadata.get("kind") == "path" and f.default not in ("", dataclasses.MISSING):
            kwargs[name] = str((base / str(f.default)).resolve())
    return cls(**kwargs)


def _validate(cfg: Config) -> None:
    src = cfg.source
    if not re.match(r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$", cfg.hostname):
        _fail(src, "hostname", f"{cfg.hostname!r} is not a host name")
    sub = cfg.submission
    if not sub.listen and not sub.implicit_tls_listen:
        _fail(src, "submission.listen", "at least one listen address is required")
    for key, items in (("submission.listen", sub.listen), ("submission.implicit_tls_listen", sub.implicit_tls_listen)):
        for i, item in enumerate(items):
            try:
                host, _ = parse_hostport(item)
                ipaddress.ip_address(host)
            except ValueError:
                _fail(src, f"{key}[{i}]", f"{item!r} is not an IP:port address")
    for i, net in enumerate(sub.relay_networks):
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            _fail(src, f"submission.relay_networks[{i}]", f"{net!r} is not a network")
    if bool(sub.tls_cert) != bool(sub.tls_key):
        _fail(src, "submission.tls_key", "tls_cert and tls_key must be set together")
    if sub.implicit_tls_listen and not sub.tls_cert:
        _fail(src, "submission.implicit_tls_listen", "needs tls_cert and tls_key")
    for key, value in (("submission.max_recipients", sub.max_recipients),
                       ("submission.max_connections", sub.max_connections),
                       ("submission.max_connections_per_client", sub.max_connections_per_client),
                       ("delivery.concurrency", cfg.delivery.concurrency),
                       ("delivery.per_domain_concurrency", cfg.delivery.per_domain_concurrency)):
        if value < 1:
            _fail(src, key, f"must be at least 1, got {value}")
    if sub.idle_timeout <= 0:
        # aiosmtpd would close every connection at once (a zero timer fires immediately).
        _fail(src, "submission.idle_timeout", "must be more than 0s")
    if sub.stress_idle_timeout <= 0:
        _fail(src, "submission.stress_idle_timeout", "must be more than 0s")
    if sub.max_message_size < 1024:
        _fail(src, "submission.max_message_size", "must be at least 1KB")
    for key, port in (("delivery.smtp_port", cfg.delivery.smtp_port), ("dns.port", cfg.dns.port),
                      ("mta_sts.https_port", cfg.mta_sts.https_port)):
        if not 0 < port < 65536:
            _fail(src, key, f"{port} is not a port number")
    for i, ns in enumerate(cfg.dns.nameservers):
        try:
            ipaddress.ip_address(ns)
        except ValueError:
            _fail(src, f"dns.nameservers[{i}]", f"{ns!r} is not an IP address")
    d = cfg.delivery
    if d.relayhost:
        try:
            parse_hostport(d.relayhost)
        except ValueError:
            _fail(src, "delivery.relayhost", f"{d.relayhost!r} is not host:port")
    if d.attempt_timeout <= 0:
        _fail(src, "delivery.attempt_timeout", "must be more than 0s")
    if d.relayhost_tls not in ("verify", "may"):
        _fail(src, "delivery.relayhost_tls", f"{d.relayhost_tls!r} must be \"verify\" or \"may\"")
    if bool(d.relayhost_username) != bool(d.relayhost_password_file):
        _fail(src, "delivery.relayhost_password_file", "relayhost_username and password file go together")
    for key, value, version in (("delivery.bind_address", d.bind_address, 4),
                                ("delivery.bind_address6", d.bind_address6, 6)):
        try:
            if value and ipaddress.ip_address(value).version != version:
                raise ValueError
        except ValueError:
            _fail(src, key, f"{value!r} is not an IPv{version} address")
    for name, mode in cfg.mta_sts.overrides.items():
        _check_override(src, f"mta_sts.overrides.{name}", mode)
    if cfg.http.listen:
        try:
            host, _ = parse_hostport(cfg.http.listen)
            ipaddress.ip_address(host)
        except ValueError:
            _fail(src, "http.listen", f"{cfg.http.listen!r} is not an IP:port address")
    if cfg.http.admin_token and (len(cfg.http.admin_token) < 16 or not cfg.http.admin_token.isprintable()
                                 or " " in cfg.http.admin_token):
        # The value itself is never echoed: it is a secret.
        _fail(src, "http.admin_token", "must be at least 16 printable characters without spaces")
    if cfg.log.format not in ("text", "json"):
        _fail(src, "log.format", f"{cfg.log.format!r} must be \"text\" or \"json\"")
    if cfg.log.level not in ("debug", "info", "warning", "error"):
        _fail(src, "log.level", f"{cfg.log.level!r} must be debug, info, warning or error")
    if not 0 <= cfg.tlsrpt.send_hour_utc <= 23:
        _fail(src, "tlsrpt.send_hour_utc", f"{cfg.tlsrpt.send_hour_utc} is not an hour 0-23")
    if cfg.tlsrpt.enabled and not (cfg.tlsrpt.contact_info and cfg.tlsrpt.report_sender):
        _fail(src, "tlsrpt.contact_info", "contact_info and report_sender are required when enabled")
    _validate_dkim(cfg)


_DKIM_DOMAIN = re.compile(r"^(?=.{1,253}\Z)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.)*"
                          r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")
_HEADER_FIELD_NAME = re.compile(r"^[!-9;-~]+\Z")


def dkim_key_for(keys: tuple[DkimKeyConfig, ...], domain: str) -> DkimKeyConfig | None:
    """The key whose domain is `domain` or its closest parent (None: no key covers it)."""
    domain = domain.lower().rstrip(".")
    covering = [k for k in keys if domain == k.domain.lower() or domain.endswith("." + k.domain.lower())]
    return max(covering, key=lambda k: len(k.domain), default=None)


def _validate_dkim(cfg: Config) -> None:
    """Shape of [dkim]; the key files themselves are checked by mta.dkim.keys (check-config, serve)."""
    src, dk = cfg.source, cfg.dkim
    for name, items in (("headers", dk.headers), ("oversign", dk.oversign)):
        for i, item in enumerate(items):
            if not _HEADER_FIELD_NAME.match(item):
                _fail(src, f"dkim.{name}[{i}]", f"{item!r} is not a header field name")
    seen: set[tuple[str, str]] = set()
    for i, key in enumerate(dk.keys):
        where = f"dkim.keys[{i}]"
        if not _DKIM_DOMAIN.match(key.domain):
            _fail(src, f"{where}.domain", f"{key.domain!r} is not a domain name (A-labels)")
        if not _DKIM_DOMAIN.match(key.selector):
            _fail(src, f"{where}.selector", f"{key.selector!r} is not a selector (RFC 6376 §3.1)")
        if not key.key_file:
            _fail(src, f"{where}.key_file", "a PEM private key file is required")
        if key.algorithm not in DKIM_ALGORITHMS:
            _fail(src, f"{where}.algorithm", f"{key.algorithm!r} must be \"rsa-sha256\" or \"ed25519-sha256\"")
        if (key.domain.lower(), key.selector.lower()) in seen:
            _fail(src, f"{where}.selector", f"{key.selector}._domainkey.{key.domain} is configured twice")
        seen.add((key.domain.lower(), key.selector.lower()))
    if dk.enabled and not dk.keys:
        _fail(src, "dkim.keys", "dkim.enabled is true but no [[dkim.keys]] table is configured")
    if cfg.tlsrpt.enabled:
        # RFC 8460 §5.3 (RPT-18): a report sent by mail MUST carry a DKIM signature of the reporting
        # domain; rua=mailto: targets are only known at send time, so demand the key up front.
        _local, _, reporting = cfg.tlsrpt.contact_info.removeprefix("mailto:").strip("<>").rpartition("@")
        if reporting and dkim_key_for(dk.keys, reporting) is None:
            _fail(src, "dkim.keys", f"no key signs for the TLS reporting domain {reporting!r} (tlsrpt.contact_info); "
                  "RFC 8460 §5.3 requires report mails to be DKIM-signed: add a [[dkim.keys]] table for it")


def _check_override(src: str, key: str, value: str) -> None:
    """Issue 10 item 9 decision: an override is "none" or a complete policy text.

    A bare "testing"/"enforce" names no `mx` patterns, so it cannot be a policy (RFC 8461 §3.2
    needs at least one for those modes); rather than guess (the published policy with another
    mode would depend on the very discovery an override exists to replace), it is refused here,
    so check-config and serve agree.
    """
    from mta.sts.policy import parse_policy  # pure (no I/O): imported late to keep config at the bottom

    if value == "none":
        return
    if value in ("testing", "enforce"):
        _fail(src, key, f"{value!r} needs mx patterns: write the whole policy, e.g. "
                        f"\"version: STSv1\\nmode: {value}\\nmx: mx.example.org\\nmax_age: 86400\\n\"")
    if not value.startswith("version: STSv1"):
        _fail(src, key, f"{value!r} must be none or a policy text (starting with \"version: STSv1\")")
    try:
        parse_policy(value.encode("utf-8", "surrogateescape"))
    except MtaError as exc:
        _fail(src, key, f"invalid policy: {exc}")


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
    from mta.dane.trust import resolver_warnings  # late, as parse_policy above: config stays at the bottom

    out.extend(f"{cfg.source}: {w}" for w in resolver_warnings(cfg))
    return out


def load(path: str | Path, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate a config file; raises ConfigError with one clear line.

    With `environ` (the CLI passes os.environ), the MTA_* variables of ENV_KEYS override the file.
    """
    p = Path(path)
    src = str(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(_one_line(f"{src}: cannot read: {exc.strerror}")) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        # ValueError covers TOMLDecodeError, UnicodeDecodeError and int()'s 4300-digit limit inside
        # tomllib; RecursionError comes from deeply nested arrays ("a = [[[[...").
        raise ConfigError(_one_line(f"{src}: invalid TOML: {exc}")) from None
    if environ is not None:
        data = _apply_env(data, env_overrides(environ))
    return from_dict(data, src, p.parent.resolve())


def from_dict(data: dict[str, Any], src: str = "<config>", base: Path | None = None) -> Config:
    """Build a Config from already-parsed TOML data (used by load and by tests)."""
    cfg: Config = _build(Config, data, src, "", base or Path.cwd())
    cfg = dataclasses.replace(cfg, source=src)
    _validate(cfg)
    return cfg


# Environment variables for the keys every deployment changes, so an orchestrator need not write a
# file (issue 19, the container image). They are applied after the TOML load and win over the
# file; documented beside their keys in config.example.toml. List values are comma-separated.
ENV_KEYS: dict[str, str] = {
    "MTA_HOSTNAME": "hostname",
    "MTA_LISTEN": "submission.listen",
    "MTA_RELAY_NETWORKS": "submission.relay_networks",
    "MTA_RELAYHOST": "delivery.relayhost",
    "MTA_RELAYHOST_TLS": "delivery.relayhost_tls",
    "MTA_NAMESERVERS": "dns.nameservers",
    "MTA_HTTP_LISTEN": "http.listen",
}
_ENV_LISTS = frozenset({"submission.listen", "submission.relay_networks", "dns.nameservers"})


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """TOML-shaped data from the ENV_KEYS variables that are set (an empty value counts as set).

    Each variable is validated on its own first, so a bad value names the variable and the key:
    `$MTA_RELAY_NETWORKS: submission.relay_networks[0]: '10.0.0.0/33' is not a network`.
    """
    out: dict[str, Any] = {}
    for var, key in ENV_KEYS.items():
        if var not in environ:
            continue
        raw = environ[var].strip()
        value: Any = [x for x in re.split(r"[,\s]+", raw) if x] if key in _ENV_LISTS else raw
        section, _, name = key.rpartition(".")
        piece = {section: {name: value}} if section else {name: value}
        from_dict(piece, f"${var}")
        out = _apply_env(out, piece)
    return out


def env_applied(environ: Mapping[str, str]) -> list[str]:
    """The ENV_KEYS variables that are set, for `mta check-config` to show what overrode the file."""
    return [var for var in ENV_KEYS if var in environ]


def _apply_env(data: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(data)
    for name, value in over.items():
        if not isinstance(value, dict):
            out[name] = value
        elif name not in out:
            out[name] = dict(value)
        elif isinstance(out[name], dict):
            out[name] = {**out[name], **value}
        # else: the file has a non-table there; leave it so the error names the file's key.
    return out
