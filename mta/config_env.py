"""MTA_* environment variables over the configuration file (issue 19, containers): which
variables exist, how each is checked on its own, and how they are laid over the TOML data.
`mta.config.load` applies them; re-exported there."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

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
    "MTA_CLUSTER_DATABASE": "cluster.database",  # issue 15: one image, every node on the same database
    "MTA_NODE_NAME": "cluster.node_name",  # e.g. the pod name of a StatefulSet
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
        from mta.config import from_dict  # late: mta.config imports this module

        from_dict(piece, f"${var}")
        out = apply_env(out, piece)
    return out


def env_applied(environ: Mapping[str, str]) -> list[str]:
    """The ENV_KEYS variables that are set, for `mta check-config` to show what overrode the file."""
    return [var for var in ENV_KEYS if var in environ]


def apply_env(data: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
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
