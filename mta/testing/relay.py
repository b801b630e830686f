"""Run the relay under test: config files, in-process relays and real `mta serve` processes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mta.config


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def dump_toml(data: dict[str, Any], prefix: str = "") -> str:
    """Enough TOML for our config: scalars, lists and nested tables."""
    def key(k: str) -> str:
        return k if k.replace("_", "").replace("-", "").isalnum() else json.dumps(k)

    def tables(v: Any) -> bool:  # a list of tables: [[name]] sections
        return isinstance(v, list) and bool(v) and all(isinstance(item, dict) for item in v)

    lines = [f"{key(k)} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict) and not tables(v)]
    for k, v in data.items():
        name = f"{prefix}{k}" if not any(c in k for c in ".:") else f'{prefix}"{k}"'
        if isinstance(v, dict):
            lines.append(f"\n[{name}]")
            lines.append(dump_toml(v, f"{name}."))
        elif tables(v):
            for item in v:
                lines.append(f"\n[[{name}]]")
                lines.append(dump_toml(item, f"{name}."))
    return "\n".join(lines)


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def base_config(tmp: Path, listen_port: int | None = None, host: str = "127.0.0.1") -> dict[str, Any]:
    """A config for tests: spool in tmp, short timeouts and retries, MTA-STS off unless asked."""
    return {
        "hostname": "relay.test",
        "submission": {"listen": [f"{host}:{listen_port or free_port(host)}"], "auth_failure_delay": "100ms"},
        "queue": {"path": str(tmp / "queue")},
        "delivery": {"retry_intervals": ["1s", "2s"], "connect_timeout": "2s", "command_timeout": "5s",
                     "data_timeout": "5s", "connection_reuse_time": "2s"},
        "dns": {"timeout": "1s"},
        "mta_sts": {"enabled": False, "cache_path": str(tmp / "queue" / "sts-cache.db"), "fetch_timeout": "3s"},
        "log": {"format": "json"},
    }


def write_config(tmp: Path, data: dict[str, Any], name: str = "config.toml") -> Path:
    path = tmp / name
    path.write_text(dump_toml(data) + "\n")
    mta.config.load(path)  # a broken test config should fail here, loudly
    return path


def listen_address(data: dict[str, Any]) -> tuple[str, int]:
    return mta.config.parse_hostport(data["submission"]["listen"][0])


def wait_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port}")


def run_cli(config: Path | None, *args: str, stdin: str | None = None,
            timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """`python -m mta ARGS --config CONFIG` (no --config when CONFIG is None)."""
    cmd = [sys.executable, "-m", "mta", *args] + (["--config", str(config)] if config else [])
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=timeout)


class RelayProcess:
    """`mta serve` as a subprocess; JSON log lines land in `log_path`."""

    def __init__(self, config: Path, data: dict[str, Any]) -> None:
        self.config = config
        self.data = data
        self.log_path = config.with_suffix(".log")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True, timeout: float = 10.0) -> RelayProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the child
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "mta", "serve", "--config", str(self.config)],
                                     stdout=log, stderr=log, env=env)
        log.close()
        if wait:
            host, port = listen_address(self.data)
            try:
                wait_port(host, port, timeout)
            except TimeoutError:
                self.kill()
                raise AssertionError("relay did not start:\n" + self.log_text()) from None
        return self

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) of the submission listener."""
        return listen_address(self.data)

    def submit(self, mail_from: str, rcpt_tos: list[str], content: bytes) -> str:
        """Submit one message over SMTP; returns its queue id. Any refusal raises AssertionError."""
        host, port = self.address
        with smtplib.SMTP(host, port, timeout=10) as s:
            s.ehlo()
            code, msg = s.mail(mail_from)
            assert code == 250, ("MAIL", code, msg)
            for r in rcpt_tos:
                code, msg = s.rcpt(r)
                assert code == 250, ("RCPT", r, code, msg)
            code, msg = s.data(content)
            assert code == 250, ("DATA", code, msg)
            return msg.decode().rsplit(" ", 1)[-1]

    def queue(self) -> list[dict[str, Any]]:
        """The spool as `mta queue list --json` shows it."""
        done = run_cli(self.config, "queue", "list", "--json")
        if done.returncode != 0:
            raise AssertionError(f"mta queue list failed ({done.returncode}): {done.stderr}")
        out: list[dict[str, Any]] = json.loads(done.stdout)
        return out

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        out = []
        for line in self.log_text().splitlines():
            with contextlib.suppress(ValueError):
                ev = json.loads(line)
                if name is None or ev.get("event") == name:
                    out.append(ev)
        return out

    def wait_event(self, name: str, count: int = 1, timeout: float = 15.0, **match: Any) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.events(name) if all(e.get(k) == v for k, v in match.items())]
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"waited for {count} {name} {match}; log:\n{self.log_text()[-4000:]}")
            time.sleep(0.05)

    def stop(self, timeout: float = 20) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@contextlib.contextmanager
def running(config: Path, data: dict[str, Any]) -> Iterator[RelayProcess]:
    relay = RelayProcess(config, data).start()
    try:
        yield relay
    finally:
        relay.kill()
