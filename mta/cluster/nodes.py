"""The node table of a cluster (issue 15, CLU-7): each node's queue summary and heartbeat.

Rule: every `heartbeat_interval` seconds a node upserts its row (name, start time, database
time of the heartbeat, and the summary `summary()` returns). `mta cluster status` reads every row
and shows how long ago each node was heard from, by the database's clock, so the nodes' own
clocks do not matter; a node silent for more than STALE_BEATS heartbeats is marked `stale`
(stopped, crashed, or cut off from the database). A heartbeat that fails is simply skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
from collections.abc import Callable
from typing import Any

import psycopg

from mta.cluster.db import ClusterDb, ClusterError

STALE_BEATS = 3


async def publish(db: ClusterDb, started: float, summary: dict[str, Any]) -> None:
    """Upsert this node's row now; raises ClusterError when the database cannot take it."""
    async def go(conn: psycopg.AsyncConnection[Any]) -> None:
        await conn.execute(
            "INSERT INTO mta_nodes (name, started_at, heartbeat_at, summary) VALUES (%s, to_timestamp(%s), now(), %s) "
            "ON CONFLICT (name) DO UPDATE SET started_at = excluded.started_at, heartbeat_at = now(), "
            "summary = excluded.summary", (db.node, started, json.dumps(summary)))

    await db.run(go)


async def heartbeat_loop(db: ClusterDb, summary: Callable[[], dict[str, Any]], started: float,
                         interval: float, stop: asyncio.Event) -> None:
    """Publish `summary()` every `interval` seconds until `stop` is set, and once more at the end."""
    while True:
        with contextlib.suppress(ClusterError):  # an outage is logged once by ClusterDb
            await publish(db, started, {**summary(), "heartbeat_interval": interval})
        if stop.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval)


async def read_nodes(db: ClusterDb) -> list[dict[str, Any]]:
    """Every node's row: name, started, last heartbeat, seconds since it, stale flag, summary."""
    async def go(conn: psycopg.AsyncConnection[Any]) -> list[tuple[Any, ...]]:
        cur = await conn.execute("SELECT name, started_at, heartbeat_at, EXTRACT(EPOCH FROM now() - heartbeat_at), "
                                 "summary FROM mta_nodes ORDER BY name")
        return list(await cur.fetchall())

    out = []
    for name, started, beat, age, summary in await db.run(go):
        info = dict(summary) if isinstance(summary, dict) else {}
        interval = float(info.pop("heartbeat_interval", 5.0) or 5.0)
        out.append({"node": name, "started": _iso(started), "heartbeat": _iso(beat),
                    "heartbeat_age": round(float(age), 1), "stale": float(age) > STALE_BEATS * interval, **info})
    return out


def _iso(ts: datetime.datetime) -> str:
    return ts.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_status(nodes: list[dict[str, Any]]) -> str:
    """The text table of `mta cluster status`."""
    if not nodes:
        return "no node has reported yet"
    lines = [f"{'NODE':<20} {'QUEUED':>7} {'ACTIVE':>7} {'DEFERRED':>8} {'HOLD':>5} {'OLDEST':<20} HEARTBEAT"]
    for n in nodes:
        beat = f"{n['heartbeat']} ({n['heartbeat_age']:.0f}s ago)" + (" STALE" if n["stale"] else "")
        lines.append(f"{n['node']:<20} {n.get('queued', 0):>7} {n.get('active', 0):>7} {n.get('deferred', 0):>8} "
                     f"{n.get('hold', 0):>5} {n.get('oldest') or '-':<20} {beat}")
    return "\n".join(lines)
