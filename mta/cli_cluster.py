"""`mta cluster status [--json]`: every node of the cluster, its queue and last heartbeat (issue 15).

Also `open_cluster`, which the other commands use to reach `[cluster] database` (policy cache
listing, TLS reports): unlike `mta serve`, a command cannot wait for the database, so an
unreachable one is an error here (exit 1, one line, no password).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import TYPE_CHECKING, Any

from mta.config import Config
from mta.errors import MtaError

if TYPE_CHECKING:
    from mta.cluster.db import ClusterDb


async def open_cluster(cfg: Config) -> ClusterDb:
    """The cluster database, connected and migrated; ClusterError when it cannot be used now."""
    from mta.cluster import node_name
    from mta.cluster.db import ClusterDb, ClusterError, redact

    if not cfg.cluster.database:
        raise MtaError(f"{cfg.source}: cluster.database is not set (this relay runs alone)")
    db = ClusterDb(cfg.cluster.database, node_name(cfg.cluster))
    if not await db.start(wait=10.0):
        reason = db.reason
        await db.close()
        raise ClusterError(f"cluster.database {redact(cfg.cluster.database)}: {reason}")
    return db


def add_cluster_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    c = sub.add_parser("cluster", help="several relays on one database").add_subparsers(dest="cluster_cmd",
                                                                                       required=True)
    p = c.add_parser("status", parents=[common], help="every node's queue sizes and last heartbeat")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)


async def _status(cfg: Config, as_json: bool) -> int:
    from mta.cluster.nodes import format_status, read_nodes

    db = await open_cluster(cfg)
    try:
        nodes = await read_nodes(db)
    finally:
        await db.close()
    print(json.dumps(nodes, indent=1) if as_json else format_status(nodes))
    return 0


def cmd_status(cfg: Config, args: argparse.Namespace) -> int:
    return asyncio.run(_status(cfg, args.json))
