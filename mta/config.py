"""Configuration: TOML (tomllib) into frozen dataclasses, validated once at start.

Rule: every problem stops the program with ONE line naming the file and the key path, e.g.
`config.toml: delivery.retry_intervals[2]: "5x" is not a duration`. Unknown keys are errors too
(a typo must never silently fall back to a default). Relative paths are resolved against the
folder of the config file, so `mta serve --config /etc/mta/config.toml` works from any cwd.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mta.config_dkim import DKIM_ALGORITHMS, DkimConfig, DkimKeyConfig, dkim_key_for, validate_dkim  # noqa: F401
from mta.config_env import ENV_KEYS, apply_env, env_applied, env_overrides
from mta.config_values import check_override, parse_duration, parse_hostport, parse_size
from mta.errors import ConfigError

__all__ = ["ENV_KEYS", "Config", "env_applied", "env_overrides", "from_dict", "load", "parse_duration",
           "parse_hostport", "parse_size"]


def _meta(kind: str) -> dict[str, str]:
    """Field metadata selecting a converter beyond plain TOML types."""
    return {"kind": kind}


MAX_SUBMISSION_PROCESSES = 256  # a bound against typos (each process holds its own memory and sockets)


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
    # Submission processes sharing the listen ports through SO_REUSEPORT (PERF-5); more than one
    # needs separate_process. 1 by default: see the README's "Performance" for what a second buys.
    processes: int = 1

    @property
    def networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(n, strict=False) for n in self.relay_networks]


@dataclass(frozen=True)
class QueueConfig:
    path: str = field(default="queue", metadata=_meta("path"))
    # Issue 18: submissions share one journal flush per batch (mta/spool/journal.py); false = one
    # file flush plus a share of a folder flush per message (the pre-journal path, kept as a fallback).
    group_commit: bool = True


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


@dataclass(frozen=True)
class ClusterConfig:
    """Several relays sharing one PostgreSQL (issue 15); empty `database` = one node on SQLite."""

    database: str = ""  # postgresql://user@host:port/db; never logged with its password
    node_name: str = ""  # empty = the host name; unique per node
    heartbeat_interval: float = field(default=5.0, metadata=_meta("duration"))


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
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
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
    if not 1 <= sub.processes <= MAX_SUBMISSION_PROCESSES:
        _fail(src, "submission.processes", f"must be 1 to {MAX_SUBMISSION_PROCESSES}, got {sub.processes}")
    if sub.processes > 1 and not sub.separate_process:
        _fail(src, "submission.processes", "more than 1 needs separate_process = true")
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
        check_override(src, f"mta_sts.overrides.{name}", mode)
    _validate_cluster(cfg.cluster, src)
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
    for key, msg in validate_dkim(cfg.dkim, cfg.tlsrpt.enabled, cfg.tlsrpt.contact_info):
        _fail(src, key, msg)  # the first problem only, like every other check here


def _validate_cluster(c: ClusterConfig, src: str) -> None:
    # Only the form here; whether the server answers is found out (and retried) at start.
    if c.database and not re.match(r"^postgres(ql)?://[^\s]*\Z", c.database):
        _fail(src, "cluster.database", "must be empty or a postgresql:// URL")
    if c.node_name and not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z", c.node_name):
        _fail(src, "cluster.node_name", f"{c.node_name!r} is not a node name (letters, digits, . _ -; up to 64)")
    if c.heartbeat_interval < 0.1:
        _fail(src, "cluster.heartbeat_interval", "must be at least 100ms")


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
        data = apply_env(data, env_overrides(environ))
    return from_dict(data, src, p.parent.resolve())


def from_dict(data: dict[str, Any], src: str = "<config>", base: Path | None = None) -> Config:
    """Build a Config from already-parsed TOML data (used by load and by tests)."""
    cfg: Config = _build(Config, data, src, "", base or Path.cwd())
    cfg = dataclasses.replace(cfg, source=src)
    _validate(cfg)
    return cfg
