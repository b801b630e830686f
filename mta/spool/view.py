"""Read-only views of the spool shared by `mta queue list/show` and the HTTP queue API.

One definition of the JSON a message is shown as, so `mta queue list --json` and
`GET /api/queue` can never drift apart.
"""

from __future__ import annotations

import datetime
import re
from typing import Any

from mta.errors import MtaError
from mta.spool.state import MessageMeta
from mta.spool.store import SpoolStore

_QUEUE_ID = re.compile(r"[0-9A-F]{21}")  # mta.spool.store.new_id: 11 + 10 upper-case hex digits


def valid_id(qid: str) -> bool:
    """True for something shaped like a queue id; anything else never reaches a file path."""
    return bool(_QUEUE_ID.fullmatch(qid))


def iso(ts: float | None) -> str | None:
    if not ts:
        return None
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def meta_json(meta: MessageMeta) -> dict[str, Any]:
    return {
        "id": meta.id, "sender": meta.sender, "created": iso(meta.created), "size": meta.size,
        "held": meta.held, "kind": meta.kind,
        "recipients": [
            {"address": r.address, "status": r.status.value, "attempts": r.attempts,
             "last_error": r.last_error or None,
             "next_attempt": iso(r.next_attempt) if not r.status.final else None,
             "sts_mode": r.sts_mode, "reason": r.reason or None}
            for r in meta.recipients
        ],
    }


def load_all(store: SpoolStore) -> list[MessageMeta]:
    """Every readable message (one that vanishes or is unreadable meanwhile is skipped)."""
    out = []
    for qid in store.ids():
        try:
            out.append(store.load_sync(qid))
        except MtaError:
            continue
    return out


def header_text(store: SpoolStore, qid: str) -> str:
    """The header section of a message, as `mta queue show` prints it."""
    data = store.read_data_sync(qid)
    end = data.find(b"\r\n\r\n")
    return data[: end if end >= 0 else len(data)].decode("utf-8", "replace")
