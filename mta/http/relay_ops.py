"""The running relay as the HTTP endpoint sees it: readiness checks, queue requests, gauges.

Takes the relay (mta.app.Relay) duck-typed, so this package never imports the composition root.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from mta import metrics
from mta.config import parse_hostport
from mta.http.health import listener_problem, spool_problem
from mta.http.server import Ops, Problems
from mta.spool.store import SUBMISSION_RESERVE


async def readiness(relay: Any) -> Problems:
    """Everything that keeps the relay from being ready (README "Operations")."""
    problems: Problems = []
    spool = await asyncio.to_thread(spool_problem, relay.store, SUBMISSION_RESERVE)
    if spool:
        problems.append({"check": "spool", "error": spool})
    task = getattr(relay, "scheduler_task", None)
    if relay.stop_event.is_set():
        problems.append({"check": "scheduler", "error": "stopping"})
    elif task is None or task.done():
        problems.append({"check": "scheduler", "error": "scheduler not running"})
    if relay.child_pid is not None and relay.child_gone.is_set():
        problems.append({"check": "listener", "error": "the listener process exited"})
        return problems
    sub = relay.cfg.submission
    probes = [(item, False) for item in sub.listen] + [(item, True) for item in sub.implicit_tls_listen]
    results = await asyncio.gather(*(listener_problem(*parse_hostport(item), tls) for item, tls in probes))
    problems.extend({"check": "listener", "error": text} for text in results if text)
    return problems


def read_state(relay: Any) -> tuple[dict[str, int], float, int]:
    """Queue gauges from the scheduler's tables, and the number of cached MTA-STS policies."""
    states, oldest = relay.scheduler.queue_state(time.time(), metrics.queue_gauges)
    cache = getattr(relay.sts, "cache", None)
    cached = cache.size() if cache is not None and hasattr(cache, "size") else 0
    return states, oldest, cached


def build_ops(relay: Any) -> Ops:
    metrics.watch_state(lambda: read_state(relay))
    return Ops(store=relay.store, request=relay.scheduler.request, readiness=lambda: readiness(relay))
