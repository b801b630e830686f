"""Message and recipient state, and every recipient transition in ONE table (as h11 does).

Pure: no I/O, no clock; `now` and `rng` are passed in.

    queued   --delivered--> delivered (final)
    queued   --transient--> deferred  (or bounced once past max_queue_lifetime, SMTP-35)
    queued   --permanent--> bounced   (final)
    deferred --delivered--> delivered
    deferred --transient--> deferred  (or bounced once past max_queue_lifetime)
    deferred --permanent--> bounced
    delivered / bounced: no transition (a final recipient is never retried)
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field, fields, replace
from typing import Any

from mta.errors import CorruptEntry
from mta.model import RecipientStatus, SmtpReply

SCHEMA = 1
QUEUED, DEFERRED = RecipientStatus.QUEUED, RecipientStatus.DEFERRED
DELIVERED, BOUNCED = RecipientStatus.DELIVERED, RecipientStatus.BOUNCED

DELIVERED_OUTCOME, TRANSIENT, PERMANENT = "delivered", "transient", "permanent"

TRANSITIONS: dict[tuple[RecipientStatus, str], RecipientStatus] = {
    (QUEUED, DELIVERED_OUTCOME): DELIVERED,
    (QUEUED, TRANSIENT): DEFERRED,
    (QUEUED, PERMANENT): BOUNCED,
    (DEFERRED, DELIVERED_OUTCOME): DELIVERED,
    (DEFERRED, TRANSIENT): DEFERRED,
    (DEFERRED, PERMANENT): BOUNCED,
}


class InvalidTransition(ValueError):
    """A final recipient was given another outcome: a bug in the caller."""


@dataclass(frozen=True)
class Outcome:
    """What one delivery attempt did for one recipient."""

    kind: str  # delivered | transient | permanent
    reply: SmtpReply
    remote_mta: str | None = None  # MX host name that gave the reply
    relay: str | None = None  # "mx[ip]:port" for the log
    tls: str | None = None  # "TLSv1.3" or None
    verified: bool = False
    sts_mode: str | None = None
    reason: str = ""  # longer explanation (e.g. the MTA-STS failure)
    policy: str = "none"  # which transport policy governed: "dane" | "mta-sts" | "none" (DANE-7)


@dataclass(frozen=True)
class Recipient:
    address: str
    status: RecipientStatus = QUEUED
    attempts: int = 0
    last_error: str = ""
    next_attempt: float = 0.0
    last_attempt: float | None = None
    remote_mta: str | None = None
    status_code: str | None = None  # RFC 3463 status of the last outcome
    sts_mode: str | None = None
    reason: str = ""
    notified: bool = False  # a DSN (failure or delay) has been queued for this recipient


@dataclass(frozen=True)
class MessageMeta:
    """Envelope and per-recipient state of one spooled message (stored as JSON, never pickle)."""

    id: str
    sender: str
    created: float
    size: int
    recipients: tuple[Recipient, ...]
    held: bool = False
    eight_bit: bool = False
    smtputf8: bool = False
    client: str = ""  # "name [ip]" of the submitting client, for logs
    kind: str = "mail"  # mail | dsn | report
    delay_warned: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pending(self) -> list[Recipient]:
        return [r for r in self.recipients if not r.status.final]

    @property
    def owed_notices(self) -> list[Recipient]:
        """Bounced recipients whose DSN is not queued yet (SMTP-39); never for <> or our own notices."""
        if self.kind != "mail" or not self.sender:
            return []
        return [r for r in self.recipients if r.status is BOUNCED and not r.notified]

    @property
    def done(self) -> bool:
        """Every recipient final and every failure notice queued: the message can go."""
        return not self.pending and not self.owed_notices

    def next_due(self) -> float | None:
        """Earliest next_attempt of a pending recipient (0: a notice is owed); None when done."""
        times = [r.next_attempt for r in self.pending] + ([0.0] if self.owed_notices else [])
        return min(times) if times else None

    def to_json(self) -> dict[str, Any]:
        # By hand: dataclasses.asdict copies every value recursively, and this runs on each spool
        # write (a tenth of the submission child's put under load, issue 18). Same result.
        data = {name: getattr(self, name) for name in _META_FIELDS}
        data["recipients"] = tuple({**{name: getattr(r, name) for name in _RCPT_FIELDS}, "status": r.status.value}
                                   for r in self.recipients)
        data["extra"] = copy.deepcopy(self.extra) if self.extra else {}
        data["schema"] = SCHEMA
        return data

    @classmethod
    def from_json(cls, data: Any) -> MessageMeta:
        try:
            if not isinstance(data, dict) or data.get("schema") != SCHEMA:
                raise ValueError("unknown schema")
            rcpts = tuple(
                Recipient(**{**r, "status": RecipientStatus(r["status"])}) for r in data["recipients"]
            )
            fields = {k: v for k, v in data.items() if k not in ("schema", "recipients")}
            meta = cls(recipients=rcpts, **fields)
            if not isinstance(meta.id, str) or not isinstance(meta.sender, str) or not rcpts:
                raise ValueError("bad envelope")
            return meta
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptEntry(f"unreadable meta: {exc}") from None


_META_FIELDS = tuple(f.name for f in fields(MessageMeta))
_RCPT_FIELDS = tuple(f.name for f in fields(Recipient))


def retry_delay(attempts: int, intervals: tuple[float, ...], rng: random.Random) -> float:
    """Delay before the next try after `attempts` tries; the last interval repeats (SMTP-34).

    A small jitter (up to 10%, capped at a minute) spreads retries so that a queue that piled
    up during an outage does not hammer the recovered host all at once.
    """
    base = intervals[min(max(attempts, 1), len(intervals)) - 1]
    return base + rng.uniform(0, min(base * 0.1, 60.0))


def apply(
    rcpt: Recipient,
    outcome: Outcome,
    *,
    now: float,
    created: float,
    intervals: tuple[float, ...],
    lifetime: float,
    rng: random.Random,
) -> Recipient:
    """The recipient after `outcome`, per TRANSITIONS; transient past `lifetime` becomes bounced."""
    target = TRANSITIONS.get((rcpt.status, outcome.kind))
    if target is None:
        raise InvalidTransition(f"{rcpt.status.value} recipient cannot take outcome {outcome.kind}")
    attempts = rcpt.attempts + 1
    new = replace(
        rcpt,
        status=target,
        attempts=attempts,
        last_attempt=now,
        last_error="" if target is DELIVERED else str(outcome.reply),
        remote_mta=outcome.remote_mta,
        status_code=outcome.reply.status,
        sts_mode=outcome.sts_mode,
        reason=outcome.reason,
    )
    if target is DEFERRED:
        if now - created >= lifetime:
            # SMTP-35: give up with the last error; 5.4.7 "delivery time expired" (DSN-7 decision).
            return replace(new, status=BOUNCED, status_code="5.4.7", next_attempt=0.0,
                           reason=(outcome.reason or str(outcome.reply)) + " (gave up: queue lifetime exceeded)")
        return replace(new, next_attempt=now + retry_delay(attempts, intervals, rng))
    return replace(new, next_attempt=0.0)


def flush(meta: MessageMeta, now: float) -> MessageMeta:
    """Make every deferred recipient due now (`mta queue flush`)."""
    rcpts = tuple(replace(r, next_attempt=now) if r.status is DEFERRED else r for r in meta.recipients)
    return replace(meta, recipients=rcpts)
