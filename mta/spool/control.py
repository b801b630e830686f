"""Operator requests (flush, delete, hold, release) from the CLI, and `new` from sendmail.

Rule: only one process writes message state. When `mta serve` holds the spool lock, the CLI
drops a small request file into ctl/ and the server applies it within a poll interval (well
under a second). When no server runs, the CLI applies the request itself, holding the lock.
`new` (a message `sendmail` just stored) changes no state: the server only schedules the id;
with no server running there is nothing to do, the start-up scan finds the message.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from dataclasses import replace
from typing import Any

from mta.errors import SpoolError
from mta.spool import state
from mta.spool.store import SpoolStore

OPS = ("flush", "delete", "hold", "release", "new")


def submit(store: SpoolStore, op: str, qid: str | None) -> None:
    """Queue a request for the running server (atomic: written to tmp/, renamed into ctl/)."""
    if op not in OPS:
        raise ValueError(f"unknown operation {op}")
    name = f"{time.time():.6f}-{secrets.token_hex(4)}.json"
    tmp = store.tmp / f"ctl-{name}"
    tmp.write_text(json.dumps({"op": op, "id": qid}))
    os.rename(tmp, store.ctl / name)


def take_requests(store: SpoolStore) -> list[dict[str, Any]]:
    """Read and delete pending requests, oldest first; unreadable ones are dropped."""
    out: list[dict[str, Any]] = []
    try:
        names = sorted(os.listdir(store.ctl))
    except FileNotFoundError:
        return out
    for name in names:
        path = store.ctl / name
        try:
            req = json.loads(path.read_text())
            if isinstance(req, dict) and req.get("op") in OPS:
                out.append(req)
        except (OSError, ValueError):
            pass
        with contextlib.suppress(OSError):
            path.unlink()
    return out


def apply_to_meta(meta: state.MessageMeta, op: str, now: float) -> state.MessageMeta | None:
    """The message after `op`; None means delete it."""
    if op == "delete":
        return None
    if op == "new":
        return meta
    if op == "hold":
        return replace(meta, held=True)
    if op == "release":
        return state.flush(replace(meta, held=False), now)
    return state.flush(meta, now)


def apply_offline(store: SpoolStore, op: str, qid: str | None) -> int:
    """Apply a request directly (no server running). Returns the number of messages changed."""
    if op == "new":
        return 0
    # A crashed server's journal first: replayed later, it would undo a delete made now (PWR-4).
    store.replay_journal()
    ids = [qid] if qid else store.ids()
    if qid and not store.exists(qid):
        raise SpoolError(f"no such message {qid}")
    now = time.time()
    count = 0
    for one in ids:
        try:
            meta = store.load_sync(one)
        except SpoolError:
            continue
        new = apply_to_meta(meta, op, now)
        if new is None:
            store._discard(one)
        else:
            store._update_sync(new)
        count += 1
    return count
