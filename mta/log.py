"""One line per event, greppable like a Postfix maillog, or JSON objects with a fixed field set.

Events: accepted, refused, deferred, delivered, bounced, policy, expired, held, deleted, started,
resume (the background read of the spool at start-up: state running/finished, counts, seconds),
stopping. JSON lines always carry: event, queue_id, recipient, domain, mx, tls, sts_mode, reason
(null when not applicable) plus whatever else the event has. Secrets are never passed here.

Lines are formatted and written to stderr by a writer thread (`ThreadedStderr`), not by the
event loop that logged them: a write to a slow log reader (a pipe to a container runtime, a file
on a disk busy with the spool's flushes) must not stall mail. A profile of the delivery process
showed the write alone at about 115 µs per delivery on the benchmark's disk (issue 18).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import sys
import threading
import time
from queue import Empty, SimpleQueue
from typing import Any

EVENT_LOGGER = "mta.event"
_FIXED = ("event", "queue_id", "recipient", "domain", "mx", "tls", "sts_mode", "reason")
_log = logging.getLogger(EVENT_LOGGER)


def event(name: str, **fields: Any) -> None:
    """Emit one event line."""
    level = logging.WARNING if name in ("bounced", "refused") else logging.INFO
    if not _log.isEnabledFor(level):
        return
    # makeRecord directly: Logger.log would walk the stack for a file and line no format shows.
    _log.handle(_log.makeRecord(EVENT_LOGGER, level, "", 0, name, None, None,
                                extra={"mta_event": {"event": name, **fields}}))


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


LINGER = 0.005  # seconds the writer waits after a short batch
BATCH = 16  # lines formatted per write at most (see ThreadedStderr._run)


class ThreadedStderr(logging.Handler):
    """Queues records for a writer thread that formats them and writes them to fd 2.

    The thread writes with os.write, not through sys.stderr, so a fork can never copy a held
    buffer lock into a child; the child starts its own thread (`after_fork`) and leaves the
    records queued before the fork to the parent. When more than BACKLOG records wait (the
    reader of stderr has stopped reading), emit writes in the caller: back-pressure instead of
    unbounded memory. `drain` writes out what is queued (at exit, before os._exit).
    """

    BACKLOG = 10_000

    def __init__(self) -> None:
        super().__init__()
        self._start()

    def _start(self) -> None:
        # Records, and Events that `drain` waits on: the queue is FIFO, so when the writer sets
        # one, every record queued before it has been written.
        self._queue: SimpleQueue[logging.LogRecord | threading.Event] = SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="mta-log", daemon=True)
        self._thread.start()

    def after_fork(self) -> None:
        self._start()

    def emit(self, record: logging.LogRecord) -> None:
        if self._queue.qsize() >= self.BACKLOG or not self._thread.is_alive():
            self._write(self._line(record))
            return
        self._queue.put(record)

    def _line(self, record: logging.LogRecord) -> bytes:
        try:
            return (self.format(record) + "\n").encode("utf-8", "backslashreplace")
        except Exception:
            self.handleError(record)
            return b""

    def _write(self, data: bytes) -> None:
        while data:
            try:
                data = data[os.write(2, data):]
            except InterruptedError:
                continue
            except BlockingIOError:  # someone made fd 2 non-blocking: wait for the reader
                time.sleep(0.005)
            except OSError:
                return  # stderr is gone: nothing left to tell anyone

    def _run(self) -> None:
        queue = self._queue
        while True:
            batch = [queue.get()]
            # One write for what piled up meanwhile, in small batches: formatting holds the GIL,
            # and an event loop waiting for it would otherwise wait up to the switch interval.
            while len(batch) < BATCH:
                try:
                    batch.append(queue.get_nowait())
                except Empty:
                    break
            self._write(b"".join(self._line(r) for r in batch if isinstance(r, logging.LogRecord)))
            for marker in batch:
                if isinstance(marker, threading.Event):
                    marker.set()
            if len(batch) < BATCH:
                # Let lines gather for a moment: one wake-up and one write per few lines, not per
                # line, under load (a line waits at most this long; idle, get() just blocks).
                time.sleep(LINGER)

    def drain(self, timeout: float = 5.0) -> None:
        """Wait (bounded) until every record queued before the call is written."""
        if not self._thread.is_alive():
            return
        marker = threading.Event()
        self._queue.put(marker)
        marker.wait(timeout)


_writer: ThreadedStderr | None = None


def drain() -> None:
    """Write out every queued log line (call before os._exit; atexit does it otherwise)."""
    if _writer is not None:
        _writer.drain()


def _after_fork() -> None:
    if _writer is not None:
        _writer.after_fork()


os.register_at_fork(after_in_child=_after_fork)
atexit.register(drain)


def configure(fmt: str = "text", level: str = "info") -> None:
    """Send every log record to stderr in the chosen format, written by a thread (see above)."""
    global _writer
    if _writer is None:
        sys.stderr.flush()  # anything printed before keeps its place ahead of the log lines
        _writer = ThreadedStderr()
    handler = _writer
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))
    # Library chatter (aiosmtpd logs every command at INFO) stays out of the mail log.
    for noisy in ("mail.log", "aiosmtpd", "asyncio", "aiohttp"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
