"""Accepting a message: the one path from "a client handed us these bytes" to "it is durable".

Used by the SMTP handler and by `sendmail`, so both give the same guarantees (README "sendmail"):
1. line ends become CRLF (SMTP-26) and the submission header fields are added (Received:, and
   Message-ID:/Date: when missing; RFC 6409 §8);
2. the size limit applies to the result;
3. the message is DKIM-signed when its From: domain has a key (DKIM-7: after every header we
   add, before the spool write, so every retry sends the same signed bytes);
4. the spool write returns only after the fsync (then the caller may say 250 / exit 0).
Without a journal, steps 3 and 4 run in one worker thread (signing is CPU, the write blocks on
the disk). In the submission child (group commit), signing runs in a thread when there is a key,
and the write's page-cache steps run on the loop with only the shared flush in a thread, one hop
per batch (mta/spool/loopput.py). Either way the event loop never waits for a flush.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from mta import log, runtime
from mta.dkim.signer import Signer
from mta.errors import MtaError
from mta.spool.state import MessageMeta
from mta.spool.store import SUBMISSION_RESERVE, SpoolStore, make_meta
from mta.submission.headers import add_submission_headers, normalise_line_ends

_log = logging.getLogger("mta.submission")


class MessageTooBig(MtaError):
    """The message with our header fields exceeds submission.max_message_size."""


@dataclass(frozen=True)
class Submission:
    sender: str  # "" = null reverse-path
    recipients: tuple[str, ...]
    raw: bytes  # as the client sent it (any line ends)
    received: str  # value of our Received: field
    client: str  # for the log and the envelope ("helo [ip]" or "local user 1000")
    smtputf8: bool = False


class Acceptor:
    """Turns a Submission into a durable spool entry (see the module rule)."""

    def __init__(self, store: SpoolStore, hostname: str, max_message_size: int, signer: Signer | None = None) -> None:
        self.store = store
        self.hostname = hostname
        self.max_message_size = max_message_size
        self.signer = signer

    def prepare(self, sub: Submission, now: float) -> bytes:
        """Steps 1 and 2: the message as it will be signed and stored; MessageTooBig."""
        data = add_submission_headers(normalise_line_ends(sub.raw), received=sub.received, hostname=self.hostname,
                                      now=now)
        if len(data) > self.max_message_size:
            raise MessageTooBig("message too big")
        return data

    def sign(self, data: bytes, now: float) -> tuple[bytes, str]:
        """Step 3 (CPU): the bytes to store, and the note for the `accepted` line."""
        if self.signer is None:
            return data, ""
        try:
            signed = self.signer.sign_submission(data, now)
            return signed.data, signed.note
        except Exception as exc:  # a signing bug must never stop mail: it goes out unsigned, logged
            _log.exception("dkim: signing failed; the message goes out unsigned")
            return data, f"unsigned: signing failed ({type(exc).__name__})"

    def _meta(self, sub: Submission, data: bytes, now: float) -> MessageMeta:
        return make_meta(sender=sub.sender, recipients=list(sub.recipients), data=data, now=now, client=sub.client,
                         eight_bit=not data.isascii(), smtputf8=sub.smtputf8)

    @staticmethod
    def _accepted(meta: MessageMeta, note: str) -> MessageMeta:
        log.event("accepted", queue_id=meta.id, **{"from": meta.sender}, nrcpt=len(meta.recipients),
                  size=meta.size, client=meta.client, dkim=note or None)
        return meta

    def store_sync(self, sub: Submission, data: bytes, now: float) -> MessageMeta:
        """Steps 3 and 4, blocking: sign, write durably, log `accepted`. Raises SpoolError."""
        data, note = self.sign(data, now)
        meta = self._meta(sub, data, now)
        # The reserve keeps room for the state and DSNs of mail already accepted (README "Spool").
        self.store.put_sync(meta, data, reserve=SUBMISSION_RESERVE)
        return self._accepted(meta, note)

    def accept_sync(self, sub: Submission, now: float | None = None) -> MessageMeta:
        """The whole path, blocking (sendmail)."""
        now = time.time() if now is None else now
        return self.store_sync(sub, self.prepare(sub, now), now)

    async def accept(self, sub: Submission, now: float | None = None) -> MessageMeta:
        """The whole path; signing and the durable write run in a worker thread (SMTP handler)."""
        now = time.time() if now is None else now
        data = self.prepare(sub, now)
        if self.store.journal is None:
            return await runtime.offload(self.store_sync, sub, data, now)
        # The submission child's journal: signing (CPU) in a thread when there is a key, the
        # writes on this loop with only the group flush in a thread (mta/spool/loopput.py).
        data, note = await runtime.offload(self.sign, data, now) if self.signer is not None else (data, "")
        meta = self._meta(sub, data, now)
        await self.store.put_on_loop(meta, data, reserve=SUBMISSION_RESERVE)
        return self._accepted(meta, note)
