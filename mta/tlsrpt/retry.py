"""When to try an undelivered TLS report again (RFC 8460 §5.5, RPT-21). Pure: time and
randomness are arguments.

A report whose every target failed is not dropped at once: RFC 8460 asks for retries over up to
24 hours, ideally with exponential back-off, and only then dropping it (reports are best-effort).
The delays double from FIRST_DELAY up to MAX_DELAY, with +-10% jitter so many reports that failed
together do not come back together; the last try is at the end of the window itself.
"""

from __future__ import annotations

import datetime
import random
from dataclasses import dataclass

WINDOW = 24 * 3600.0  # how long after the first failure a report is still tried
FIRST_DELAY = 60.0
MAX_DELAY = 2 * 3600.0


@dataclass(frozen=True)
class PendingPost:
    """One report waiting for another POST to one https rua target."""

    day: datetime.date
    domain: str
    url: str
    report_id: str
    body: bytes  # the gzip report, exactly as first sent (same report-id every time)
    first_failed: float
    tries: int  # failed rounds so far
    next_try: float
    last_error: str


def next_try(first_failed: float, tries: int, now: float, rng: random.Random, *, window: float = WINDOW,
             first_delay: float = FIRST_DELAY, max_delay: float = MAX_DELAY) -> float | None:
    """The time of the next try after `tries` failed rounds (the first at `first_failed`), or None
    when the window is over and the report is given up."""
    end = first_failed + window
    if now >= end:
        return None
    delay = min(max_delay, first_delay * 2.0 ** max(0, tries - 1)) * rng.uniform(0.9, 1.1)
    return min(now + delay, end)
