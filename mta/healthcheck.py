"""Container HEALTHCHECK: `python3 -m mta.healthcheck` exits 0 when the relay is ready, else 1.

It reads the configuration exactly as `mta serve` does ($MTA_CONFIG or --config, then the MTA_*
overrides), so the probe goes where the listeners really are even when a variable moves them.
With the HTTP endpoint on (`[http] listen`), it asks `GET /readyz` (spool, listeners and
scheduler; issue 14) for a 200; without it, it speaks SMTP to the first listen address: a 220
greeting and a 250 to NOOP. Wildcard addresses are reached on loopback. One line on stderr says
why it failed.
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import os
import smtplib
import sys

from mta import config as config_mod
from mta.errors import MtaError


def probe_address(listen: str) -> tuple[str, int]:
    """The address to probe for one `listen` entry: wildcards become the matching loopback."""
    host, port = config_mod.parse_hostport(listen)
    ip = ipaddress.ip_address(host)
    if ip.is_unspecified:
        host = "::1" if ip.version == 6 else "127.0.0.1"
    return host, port


def smtp_alive(host: str, port: int, timeout: float) -> str | None:
    """None when the server greets with 220 and answers NOOP with 250; else the reason."""
    try:
        with smtplib.SMTP(host, port, timeout=timeout) as smtp:  # raises unless the greeting is 220
            code, text = smtp.noop()
            if code != 250:
                return f"NOOP answered {code} {text.decode(errors='replace')}"
    except (OSError, smtplib.SMTPException) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def http_ready(host: str, port: int, timeout: float) -> str | None:
    """None when GET /readyz answers 200; else the reason (its 503 body names what is wrong).

    http.client rather than urllib: a health probe must never go through an http_proxy variable.
    """
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", "/readyz")
        resp = conn.getresponse()
        body = resp.read(2000).decode(errors="replace").strip()
    except (OSError, http.client.HTTPException) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()
    return None if resp.status == 200 else f"/readyz answered {resp.status} {body}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m mta.healthcheck", description=__doc__.splitlines()[0])
    p.add_argument("--config", default=os.environ.get("MTA_CONFIG") or "config.toml")
    p.add_argument("--timeout", type=float, default=4.0)
    args = p.parse_args(argv)
    try:
        cfg = config_mod.load(args.config, os.environ)
    except MtaError as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    if cfg.http.listen:
        host, port = probe_address(cfg.http.listen)
        reason = http_ready(host, port, args.timeout)
        if reason:
            print(f"unhealthy: http://{host}:{port}/readyz: {reason}", file=sys.stderr)
            return 1
        return 0
    listen = cfg.submission.listen[0] if cfg.submission.listen else None
    if listen is None:
        print("unhealthy: no plain submission.listen address to probe", file=sys.stderr)
        return 1
    host, port = probe_address(listen)
    reason = smtp_alive(host, port, args.timeout)
    if reason:
        print(f"unhealthy: SMTP {host}:{port}: {reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
