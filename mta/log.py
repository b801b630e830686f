"""One line per event, greppable like a Postfix maillog, or JSON objects with a fixed field set.

Events: accepted, refused, deferred, delivered, bounced, policy, expired, held, deleted, started,
resume (the background read of the spool at start-up: state running/finished, counts, seconds),
stopping. JSON lines always carry: event, queue_id, recipient, domain, mx, tls, sts_mode, reason
(null when not applicable) plus whatever else the event has. Secrets are never passed here.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

EVENT_LOGGER = "mta.event"
_FIXED = ("event", "queue_id", "recipient", "domain", "mx", "tls", "sts_mode", "reason")
_log = logging.getLogger(EVENT_LOGGER)


def event(name: str, **fields: Any) -> None:
    """Emit one event line."""
    level = logging.WARNING if name in ("bounced", "refused") else logging.INFO
    _log.log(level, name, extra={"mta_event": {"event": name, **fields}})


def _text_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


class TextFormatter(logging.Formatter):
    """`2026-11-29T05:00:00Z mta[event]: QUEUEID: to=<a@b>, relay=..., status=sent (250 ok)`."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created))
        ev: dict[str, Any] | None = getattr(record, "mta_event", None)
        if ev is None:
            msg = record.getMessage()
            if record.exc_info:
                msg += " " + self.formatException(record.exc_info).replace("\n", " | ")
            return f"{stamp} mta[{record.levelname.lower()}]: {msg}"
        ev = dict(ev)
        name = ev.pop("event")
        qid = ev.pop("queue_id", None)
        parts = []
        for key in ("from", "to", "recipient"):
            if ev.get(key) is not None:
                parts.append(f"{'to' if key == 'recipient' else key}=<{ev.pop(key)}>")
            else:
                ev.pop(key, None)
        reply = ev.pop("reply", None)
        for key, value in ev.items():
            if value is None or value == "":
                continue
            parts.append(f"{key}={_text_value(value)}")
        if reply:
            parts.append(f"({reply})")
        prefix = f"{qid}: " if qid else ""
        return f"{stamp} mta[{name}]: {prefix}" + ", ".join(parts)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ev: dict[str, Any] | None = getattr(record, "mta_event", None)
        out: dict[str, Any] = {"time": round(record.created, 3)}
        if ev is None:
            out.update({key: None for key in _FIXED})
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + self.formatException(record.exc_info)
            out.update(event="log", level=record.levelname.lower(), message=message)
        else:
            out.update({key: None for key in _FIXED})
            out.update(ev)
        return json.dumps(out, default=str)


def configure(fmt: str = "text", level: str = "info") -> None:
    """Send every log record to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))
    # Library chatter (aiosmtpd logs every command at INFO) stays out of the mail log.
    for noisy in ("mail.log", "aiosmtpd", "asyncio", "aiohttp"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
