"""Start-up recovery of the spool: what a crash or power cut left, sorted into keep, drop, quarantine.

Per queue id, by the files msg/ holds (see store.py for the formats):
    <id>.msg [+ <id>.json]   a committed message (current format): resumed
    <id>.json + <id>.eml     a committed message (old format, two files): resumed
    <id>.eml alone           data whose envelope never landed: never acknowledged, removed
    <id>.json alone          the state left behind by an interrupted removal: removed
An envelope that does not parse (torn by a power cut, or edited by hand) sends every file of the
message to corrupt/ for the operator; it is never deleted silently.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import defaultdict
from collections.abc import Iterator
from typing import TYPE_CHECKING

from mta.errors import CorruptEntry, SpoolError
from mta.spool.state import MessageMeta
from mta.spool.store import fsync_dir

if TYPE_CHECKING:
    from mta.spool.store import SpoolStore

log = logging.getLogger("mta.spool")


def recover(store: SpoolStore) -> Iterator[MessageMeta]:
    for entry in os.scandir(store.tmp):
        with contextlib.suppress(OSError):
            os.unlink(entry.path)
    parts: dict[str, set[str]] = defaultdict(set)
    for entry in os.scandir(store.msg):
        stem, _, ext = entry.name.rpartition(".")
        parts[stem].add(ext)
    for qid in sorted(parts):
        exts = parts[qid]
        if "msg" not in exts and not {"json", "eml"} <= exts:
            for ext in exts & {"json", "eml"}:
                what = "data without envelope" if ext == "eml" else "envelope without data"
                log.warning("spool: removing %s %s (never acknowledged or already done)", what, qid)
                with contextlib.suppress(OSError):
                    os.unlink(store.msg / f"{qid}.{ext}")
            continue
        try:
            meta = store.load_sync(qid)
            store.check_whole(qid)
        except CorruptEntry as exc:
            # Every file goes along: left alone, the next start would delete the rest as debris.
            log.error("spool: %s; moved to corrupt/ with its data", exc)
            for ext in exts & {"msg", "json", "eml"}:
                with contextlib.suppress(OSError):
                    os.rename(store.msg / f"{qid}.{ext}", store.corrupt / f"{qid}.{ext}")
            # Flush the new names before any flush of msg/ can make the removal durable alone.
            with contextlib.suppress(OSError):
                fsync_dir(store.corrupt)
            continue
        except (SpoolError, OSError):
            continue
        yield meta
