"""Several relays on one PostgreSQL (issue 15): shared policy cache, TLS-RPT counters, node table.

Only used when `[cluster] database` is set; a single node keeps its SQLite files and never
imports psycopg. `mta.app` makes the choice once (ARCHITECTURE.md, "State stores").
"""

from __future__ import annotations

import socket

from mta.config import ClusterConfig


def node_name(cfg: ClusterConfig) -> str:
    """This node's name in the cluster: `[cluster] node_name`, else the host name."""
    return cfg.node_name or socket.gethostname().split(".")[0] or "mta"
