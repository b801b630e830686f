"""Every Prometheus metric of mta, and the small functions the rest of the code calls to count.

Rules (issue 14):
- The names and labels below are an interface: dashboards and alerts outside the project use them.
- Label values come from small fixed sets (`_clean` maps anything else to "other"): never a
  domain, an address or client text, so the number of series stays bounded.
- Each event is counted once, in the process where it happens. The listener child
  (mta.submission.process) does not export anything itself: `forward_to` makes it buffer its
  increments and send them over the pipe it already uses for queue ids; the parent applies them
  (`apply_forwarded`) to these same objects, so one scrape of the parent is complete.
  Why not prometheus-client's multiprocess mode: it needs an environment variable set before
  the first import, a directory wiped at every start and written on every increment (the spool
  disk may be the one that is full), and per-pid files plus `mark_process_dead` bookkeeping for
  gauges; the pipe is already there, ordered, and the child's counts arrive before the queue id
  they belong to.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

_log = logging.getLogger("mta.metrics")

# No `_created` series: they double the exposition and no alert or dashboard here uses them.
disable_created_metrics()
REGISTRY = CollectorRegistry()

RESULTS = ("delivered", "deferred", "bounced")
POLICIES = ("mta-sts", "dane", "none")
STS_MODES = ("enforce", "testing", "none")
LOOKUP_SOURCES = ("cache", "fetch", "override", "none", "error")
QUEUE_STATES = ("active", "deferred", "hold")
TLS_VERSIONS = ("TLSv1.3", "TLSv1.2", "TLSv1.1", "TLSv1", "SSLv3", "none")
REPORT_METHODS = ("mailto", "https")
DKIM_ALGORITHMS = ("rsa-sha256", "ed25519-sha256", "rsa-sha1")
# RFC 8460 §4.3 result types (the STS and DANE failures a session or a discovery can end with).
RESULT_TYPES = ("starttls-not-supported", "certificate-host-mismatch", "certificate-expired",
                "certificate-not-trusted", "validation-failure", "tlsa-invalid", "dnssec-invalid",
                "dane-required", "sts-policy-fetch-error", "sts-policy-invalid", "sts-webpki-invalid")

MESSAGES_RECEIVED = Counter("mta_messages_received_total", "Messages accepted (250 after DATA), by listener",
                            ["listener"], registry=REGISTRY)
MESSAGES_REJECTED = Counter("mta_messages_rejected_total",
                            "Submissions refused at MAIL, RCPT, DATA or connect, by SMTP reply code",
                            ["code"], registry=REGISTRY)
DELIVERIES = Counter("mta_deliveries_total", "Recipient outcomes of delivery attempts",
                     ["result", "policy", "sts_mode"], registry=REGISTRY)
ATTEMPT_SECONDS = Histogram("mta_delivery_attempt_seconds", "Duration of one attempt (one message, one domain)",
                            ["result"], registry=REGISTRY,
                            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
TLS_SESSIONS = Counter("mta_tls_sessions_total", "Outbound SMTP sessions opened, by TLS version (none: plaintext)",
                       ["version", "verified"], registry=REGISTRY)
STS_LOOKUPS = Counter("mta_sts_policy_lookups_total", "MTA-STS policy lookups, by where the answer came from",
                      ["source"], registry=REGISTRY)
STS_FAILURES = Counter("mta_sts_failures_total", "TLS and policy failures by RFC 8460 result type",
                       ["result_type"], registry=REGISTRY)
TLSRPT_REPORTS = Counter("mta_tlsrpt_reports_sent_total", "TLS reports handed to a rua target",
                         ["method", "result"], registry=REGISTRY)
SMTP_CONNECTIONS = Gauge("mta_smtp_connections", "Open client connections, by listener", ["listener"],
                         registry=REGISTRY)
DKIM_SIGNATURES = Counter("mta_dkim_signatures_total", "DKIM signatures made, by algorithm", ["algorithm"],
                          registry=REGISTRY)

_BY_NAME: dict[str, Counter | Gauge] = {
    m._name: m for m in (MESSAGES_RECEIVED, MESSAGES_REJECTED, DELIVERIES, TLS_SESSIONS, STS_LOOKUPS,  # type: ignore[attr-defined]
                         STS_FAILURES, TLSRPT_REPORTS, SMTP_CONNECTIONS, DKIM_SIGNATURES)
}


def _init_series() -> None:
    """Series of the fixed label sets exist from the start (at 0), so rate() and alerts see them."""
    for result in RESULTS:
        ATTEMPT_SECONDS.labels(result)
        for policy in POLICIES:
            for mode in STS_MODES:
                DELIVERIES.labels(result, policy, mode)
    for source in LOOKUP_SOURCES:
        STS_LOOKUPS.labels(source)
    for method in REPORT_METHODS:
        for outcome in ("sent", "failed"):
            TLSRPT_REPORTS.labels(method, outcome)


_init_series()
_HISTOGRAMS = {result: ATTEMPT_SECONDS.labels(result) for result in RESULTS}


def _clean(value: str | None, allowed: Iterable[str], default: str = "other") -> str:
    return value if value is not None and value in allowed else default


# ----- on/off -------------------------------------------------------------------------------------

_enabled = True


def set_enabled(flag: bool) -> None:
    """`mta serve` without `[http] listen` has no one to export to: counting is switched off and
    every hook below returns at once (the with/without cost is in the README's Performance)."""
    global _enabled
    _enabled = flag


# ----- forwarding from the listener child -------------------------------------------------------

_forward: Callable[[str], None] | None = None
_loop: asyncio.AbstractEventLoop | None = None
_loop_thread: int | None = None
_children: dict[tuple[Counter | Gauge, tuple[str, ...]], Any] = {}
_pending: dict[tuple[str, tuple[str, ...]], float] = {}
_flush_scheduled = False
FORWARD_PREFIX = "M "


def forward_to(write: Callable[[str], None] | None) -> None:
    """In the listener child, on its event loop: send increments through `write` (one line each
    flush) instead of keeping them here; None restores local counting."""
    global _forward, _loop, _loop_thread
    _forward = write
    _pending.clear()
    try:
        _loop, _loop_thread = asyncio.get_running_loop(), threading.get_ident()
    except RuntimeError:
        _loop = _loop_thread = None


def flush_forwarded() -> None:
    """Write the buffered increments now (the child calls it before each queue id line)."""
    global _flush_scheduled
    _flush_scheduled = False
    if _forward is None or not _pending:
        return
    items = [[name, list(labels), amount] for (name, labels), amount in _pending.items() if amount]
    _pending.clear()
    if items:
        _forward(FORWARD_PREFIX + json.dumps(items, separators=(",", ":")) + "\n")


def apply_forwarded(text: str) -> None:
    """In the parent: apply one line written by a child's flush_forwarded (bad input is logged)."""
    try:
        items = json.loads(text)
        for name, labels, amount in items:
            metric = _BY_NAME[name]
            if not isinstance(labels, list) or len(labels) != len(metric._labelnames):  # type: ignore[attr-defined]
                raise ValueError(f"{name}: wrong labels {labels!r}")
            _add(metric, tuple(str(v) for v in labels), float(amount))
    except (ValueError, TypeError, KeyError) as exc:
        _log.error("ignoring a malformed metrics line from the listener process: %s", exc)


def _add(metric: Counter | Gauge, labels: tuple[str, ...], amount: float = 1.0) -> None:
    global _flush_scheduled
    if not _enabled:
        return
    if _forward is None:
        child = _children.get((metric, labels))
        if child is None:
            # labels() validates and locks on every call; the label sets are small and fixed, so the
            # children are kept (this is most of the per-event cost, see the README's Performance).
            child = _children[(metric, labels)] = metric.labels(*labels)
        child.inc(amount)
        return
    if _loop is not None and threading.get_ident() != _loop_thread:
        # From a worker thread (DKIM signing runs in one): the buffer and the pipe belong to the
        # loop. Queued ahead of the completion of the thread's work, so still before the queue id.
        _loop.call_soon_threadsafe(_add, metric, labels, amount)
        return
    key = (metric._name, labels)  # type: ignore[attr-defined]
    _pending[key] = _pending.get(key, 0.0) + amount
    if not _flush_scheduled:
        # One line per event-loop turn at most, however many events the turn had.
        try:
            asyncio.get_running_loop().call_soon(flush_forwarded)
            _flush_scheduled = True
        except RuntimeError:
            flush_forwarded()


# ----- what the code counts ---------------------------------------------------------------------

def message_received(listener: str) -> None:
    _add(MESSAGES_RECEIVED, (listener,))


def message_rejected(reply: str) -> None:
    """`reply` is our own reply line ("554 5.7.1 ..."); only its 3-digit code becomes a label."""
    code = reply[:3]
    _add(MESSAGES_REJECTED, (code if code.isdigit() and code[0] in "45" else "other",))


def connection_opened(listener: str) -> None:
    _add(SMTP_CONNECTIONS, (listener,))


def connection_closed(listener: str) -> None:
    _add(SMTP_CONNECTIONS, (listener,), -1.0)


def delivery(result: str, sts_mode: str | None, policy: str | None = None) -> None:
    """One recipient outcome. `policy` defaults from the STS mode: "mta-sts" when a policy in
    enforce or testing governed the attempt, else "none"; DANE passes "dane"."""
    mode = sts_mode if sts_mode in ("enforce", "testing") else "none"
    if policy is None:
        policy = "mta-sts" if mode != "none" else "none"
    _add(DELIVERIES, (_clean(result, RESULTS), _clean(policy, POLICIES), mode))


def attempt_finished(seconds: float, outcome_kinds: Iterable[str]) -> None:
    """One attempt for one domain: delivered if any recipient was, else bounced if any was
    refused permanently, else deferred."""
    if not _enabled:
        return
    kinds = set(outcome_kinds)
    result = "delivered" if "delivered" in kinds else "bounced" if "permanent" in kinds else "deferred"
    _HISTOGRAMS[result].observe(seconds)


def tls_session(version: str | None, verified: bool) -> None:
    _add(TLS_SESSIONS, (_clean(version or "none", TLS_VERSIONS), "yes" if verified else "no"))


def sts_lookup(source: str, failed: bool = False) -> None:
    """`source` as mta.sts.service.PolicyResult has it (cache, fetched, override, none)."""
    label = {"fetched": "fetch", "cache": "cache", "override": "override"}.get(source)
    _add(STS_LOOKUPS, (label or ("error" if failed else "none"),))


def sts_failure(result_type: str | None) -> None:
    _add(STS_FAILURES, (_clean(result_type, RESULT_TYPES),))


def tlsrpt_report(method: str, ok: bool) -> None:
    _add(TLSRPT_REPORTS, (_clean(method, REPORT_METHODS), "sent" if ok else "failed"))


def dkim_signed(algorithm: str = "rsa-sha256") -> None:
    """Hook for every DKIM signature made (TLS reports, and outgoing mail when that is signed)."""
    _add(DKIM_SIGNATURES, (_clean(algorithm, DKIM_ALGORITHMS),))


class CountingRecorder:
    """Wraps the TLS-RPT session recorder (mta.delivery.attempt.SessionRecorder): every failed
    session or discovery is counted by result type, whether or not TLS reporting is on."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def record(self, **kwargs: Any) -> None:
        if not kwargs.get("success") and kwargs.get("result_type"):
            sts_failure(kwargs["result_type"])
        self.inner.record(**kwargs)


# ----- gauges computed at scrape time -----------------------------------------------------------

def queue_gauges(due: Mapping[str, float], inflight: Iterable[str], held: Iterable[str], now: float,
                 created: Callable[[str], float]) -> tuple[dict[str, int], float]:
    """(messages per state, age of the oldest in seconds) from the scheduler's tables; pure.

    active: being tried or due now; deferred: waiting for a retry time; hold: parked by the
    operator. `created` gives a message's arrival time from its id (ids start with it)."""
    inflight = set(inflight)
    held = set(held)
    active = len(inflight)
    deferred = 0
    oldest: str | None = None
    for qid, when in due.items():
        if qid in inflight:
            continue
        if when <= now:
            active += 1
        else:
            deferred += 1
        if oldest is None or qid < oldest:
            oldest = qid
    for qid in inflight | held:
        if oldest is None or qid < oldest:
            oldest = qid
    age = max(0.0, now - created(oldest)) if oldest is not None else 0.0
    return {"active": active, "deferred": deferred, "hold": len(held)}, age


class StateCollector(Collector):
    """Queue and policy-cache gauges, read from the running relay when scraped."""

    def __init__(self, read: Callable[[], tuple[dict[str, int], float, int]]) -> None:
        self.read = read

    def collect(self) -> Iterable[Any]:
        states, oldest, cached = self.read()
        queue = GaugeMetricFamily("mta_queue_messages", "Messages in the spool, by state", labels=["state"])
        for state in QUEUE_STATES:
            queue.add_metric([state], states.get(state, 0))
        yield queue
        yield GaugeMetricFamily("mta_queue_oldest_message_seconds", "Age of the oldest message in the spool",
                                value=oldest)
        yield GaugeMetricFamily("mta_sts_policies_cached", "MTA-STS policies in the cache", value=cached)


_state: list[StateCollector] = []
_cluster_up: list[Gauge] = []


def cluster_database(up: bool) -> None:
    """`mta_cluster_database_up` (issue 15): 1 while the cluster database answers, 0 while it does
    not. Registered on first use, so a relay without `[cluster] database` does not export it."""
    if not _cluster_up:
        _cluster_up.append(Gauge("mta_cluster_database_up", "1 while the cluster database is reachable, else 0",
                                 registry=REGISTRY))
    _cluster_up[0].set(1.0 if up else 0.0)


def watch_state(read: Callable[[], tuple[dict[str, int], float, int]]) -> None:
    """Register (or replace) the reader behind the queue and policy-cache gauges."""
    for old in _state:
        REGISTRY.unregister(old)
    _state.clear()
    collector = StateCollector(read)
    REGISTRY.register(collector)
    _state.append(collector)


def exposition() -> bytes:
    """The Prometheus text format of every metric."""
    return generate_latest(REGISTRY)
