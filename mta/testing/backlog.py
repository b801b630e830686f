"""A spool holding many deferred messages, written quickly (issue 18, PERF-4: scale tests and bench).

Rule: the first message is written by the spool's own code (SpoolStore._put_sync: the current
one-file format msg/<id>.msg, through tmp/ and a rename); every other one is a copy of that
file with its queue id replaced, written straight to store.mail_path (about 50 us each on ext4,
so 1,000,000 take about a minute). No per-file flush; one sync(2) at the end: building a backlog
is set-up, not durability under test. Every recipient is DEFERRED with its next attempt `due_in`
seconds ahead, as after one failed attempt.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

from mta.spool.state import DEFERRED, Recipient
from mta.spool.store import SpoolStore, make_meta, new_id

WEEK = 7 * 86400.0


class _Unflushed(SpoolStore):
    @staticmethod
    def _write_synced(path: Path, data: bytes, flush: bool = True) -> None:
        with open(path, "wb") as f:
            f.write(data)


def write_backlog(path: Path, count: int, size: int = 2048, *, due_in: float = WEEK,
                  domain: str = "deferred.test") -> list[str]:
    """Write `count` deferred messages of about `size` bytes into the spool at `path`; their ids."""
    store = _Unflushed(path)
    store.prepare()
    now = time.time()
    body = b"".join((f"{i}" + "X" * 78)[:78].encode() + b"\r\n" for i in range(max(1, size // 80)))
    rcpt = f"user@{domain}"
    data = (f"From: <bench@source.test>\r\nTo: <{rcpt}>\r\nSubject: backlog\r\n"
            f"Message-ID: <backlog@source.test>\r\n\r\n").encode() + body
    template = make_meta(sender="bench@source.test", recipients=[rcpt], data=data, now=now - 3600)
    template = replace(template, recipients=(Recipient(
        address=rcpt, status=DEFERRED, attempts=1, last_attempt=now - 1800, next_attempt=now + due_in,
        last_error="451 4.4.1 backlog, deliberately deferred", status_code="4.4.1"),))
    ids: list[str] = []
    raw = b""
    for _ in range(count):
        qid = new_id(now - 3600)
        if not raw:
            store._put_sync(replace(template, id=qid), data)
            raw = store.mail_path(qid).read_bytes()
            first = qid.encode()
        else:
            while True:
                try:
                    fd = os.open(store.mail_path(qid), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                    break
                except FileExistsError:
                    # Every id here has the same millisecond, so only its 40 random bits differ:
                    # among a million, two are likely to meet (about 0.45). Draw again.
                    qid = new_id(now - 3600)
            try:
                os.write(fd, raw.replace(first, qid.encode(), 1))
            finally:
                os.close(fd)
        ids.append(qid)
    os.sync()
    return ids
