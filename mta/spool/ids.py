"""Queue ids and fresh envelopes (pure apart from the clock and the random bits they are given)."""

from __future__ import annotations

import secrets
import time

from mta.spool.state import MessageMeta, Recipient


def new_id(now: float) -> str:
    """Sortable, unique queue id: milliseconds since the epoch plus 40 random bits, hex."""
    return f"{int(now * 1000):011X}{secrets.token_hex(5).upper()}"


def id_created(qid: str) -> float:
    """The arrival time a queue id starts with (see new_id); 0.0 for anything else."""
    try:
        return int(qid[:11], 16) / 1000
    except ValueError:
        return 0.0


def make_meta(
    *, sender: str, recipients: list[str], data: bytes, now: float | None = None, client: str = "",
    kind: str = "mail", eight_bit: bool = False, smtputf8: bool = False,
) -> MessageMeta:
    """A fresh MessageMeta with every recipient queued and due now."""
    created = time.time() if now is None else now
    return MessageMeta(
        id=new_id(created),
        sender=sender,
        created=created,
        size=len(data),
        recipients=tuple(Recipient(address=r, next_attempt=created) for r in recipients),
        client=client,
        kind=kind,
        eight_bit=eight_bit,
        smtputf8=smtputf8,
    )
