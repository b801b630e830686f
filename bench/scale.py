"""Scale case: a spool holding 100,000 deferred messages (mta only; Postfix has no counterpart here).

Rule: the deferred messages are written straight into the spool layout with the spool's own
types (mta.spool.store.SpoolStore paths, make_meta, state.Recipient(status=DEFERRED,
next_attempt = a week ahead)), one sync(2) at the end instead of an fsync per file: building the
backlog is set-up, not a measured figure. Then, per run:

1. empty queue: a fresh relay takes NEW messages (20 sessions, 2 KB, many per connection, to
   smtp-sink): the reference end-to-end rate; its idle CPU before the load is the baseline tick.
2. loaded queue: a relay started on the backlog: time from exec to listening (the spool scan
   happens before the listener opens) and the `resume_seconds` it logs; RSS once listening; idle
   CPU over IDLE_SECONDS divided by the number of scheduler ticks in that window (one tick per
   mta.scheduler.CTL_POLL); then the same NEW messages while the backlog stays deferred.
3. The loaded end-to-end rate must be at least 80% of the empty-queue rate (issue requirement),
   and the backlog must still be all there, untouched, afterwards.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import procstat
import runner
from world import World

from mta.scheduler import CTL_POLL, Scheduler
from mta.spool.state import DEFERRED, Recipient
from mta.spool.store import SpoolStore, make_meta

IDLE_SECONDS = 10.0  # /proc CPU has 10 ms resolution: 10 s / CTL_POLL ticks -> 0.25 ms per tick
TICK_SECONDS = 3.0
WEEK = 7 * 86400.0
REQUIRED = 0.80


def build_backlog(path: Path, count: int, size: int) -> float:
    """Write `count` deferred messages into a spool at `path`; returns the seconds it took."""
    started = time.monotonic()
    store = SpoolStore(path)
    store.prepare()
    now = time.time()
    body = b"".join((f"{i}" + "X" * 78)[:78].encode() + b"\r\n" for i in range(max(1, size // 80)))
    for i in range(count):
        rcpt = f"user{i}@deferred.test"
        data = (f"From: <bench@source.test>\r\nTo: <{rcpt}>\r\nSubject: backlog {i}\r\n"
                f"Message-ID: <backlog.{i}@source.test>\r\n\r\n").encode() + body
        meta = make_meta(sender="bench@source.test", recipients=[rcpt], data=data, now=now - 3600)
        meta = replace(meta, recipients=(Recipient(
            address=rcpt, status=DEFERRED, attempts=1, last_attempt=now - 1800, next_attempt=now + WEEK,
            last_error="451 4.4.1 bench: backlog, deliberately deferred", status_code="4.4.1"),))
        store.data_path(meta.id).write_bytes(data)
        store.meta_path(meta.id).write_text(json.dumps(meta.to_json()))
    os.sync()
    return time.monotonic() - started


def count_backlog(path: Path) -> int:
    return sum(1 for e in os.scandir(SpoolStore(path).msg) if e.name.endswith(".json"))


async def _scheduler_cpu(store: SpoolStore, ids: list[str], seconds: float) -> float:
    """CPU of this thread while an mta Scheduler holding `ids` (all due in a week) idles."""
    async def never(qid: str) -> float | None:
        raise AssertionError(f"{qid} handed out although it is due in a week")

    sched = Scheduler(store, never, concurrency=50)
    due = time.time() + WEEK
    for qid in ids:
        sched.schedule(qid, due)
    stop = asyncio.Event()
    cpu0 = time.thread_time()
    task = asyncio.create_task(sched.run(stop))
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.wait_for(task, 5)
    return time.thread_time() - cpu0


def tick_cost(spool: Path) -> dict[str, float]:
    """Cost of one scheduler tick, in process (thread CPU time, ns resolution): the heap
    holding every id of the backlog vs an empty heap, same ctl/ folder, TICK_SECONDS each."""
    store = SpoolStore(spool)
    ids = store.ids()
    ticks = TICK_SECONDS / CTL_POLL
    loaded = asyncio.run(_scheduler_cpu(store, ids, TICK_SECONDS))
    empty = asyncio.run(_scheduler_cpu(store, [], TICK_SECONDS))
    return {"tick_ms_loaded": loaded * 1000 / ticks, "tick_ms_empty": empty * 1000 / ticks}


def _idle(root: int, relay: Any) -> dict[str, Any]:
    """Idle cost right after start-up: CPU per scheduler tick, RSS, what the relay logged."""
    time.sleep(1.0)  # let start-up work settle
    rss = procstat.rss_mb(root)
    cpu0 = procstat.tree_cpu(root)
    time.sleep(IDLE_SECONDS)
    cpu = procstat.tree_cpu(root) - cpu0
    started = relay.proc.events("started")
    out = {"idle_ms_per_tick": cpu * 1000 / (IDLE_SECONDS / CTL_POLL), "idle_cpu_pct": cpu * 100 / IDLE_SECONDS,
           "rss_after_start_mb": rss}
    if started:
        out["resume_seconds"] = started[-1].get("resume_seconds")
        out["queued_at_start"] = started[-1].get("queued")
    return out


def run(world: World, root: Path, *, deferred: int, new: int, runs: int, sessions: int, size: int,
        deadline: float) -> tuple[list[list[str]], list[str]]:
    """Measure the scale case; returns table rows (case | metric | mta | postfix | ratio) and notes."""
    spool = root / "backlog"
    print(f"  scale: writing {deferred} deferred messages to {spool}", flush=True)
    gen_seconds = build_backlog(spool, deferred, size)
    print(f"  scale: backlog written in {gen_seconds:.1f}s", flush=True)
    try:
        ticks = tick_cost(spool)
    except Exception as exc:  # the scheduler's API moved: report it, measure the rest
        ticks = {}
        print(f"  scale: in-process scheduler tick not measured: {exc!r}", flush=True)
    case = runner.CASES["plain-reuse"]
    empty: list[dict[str, Any]] = []
    loaded: list[dict[str, Any]] = []
    notes: list[str] = []
    for i in range(runs):
        if time.monotonic() > deadline:
            notes.append("scale: stopped early (--max-minutes)")
            break
        for label, results, overrides in (("empty", empty, None), ("loaded", loaded, {"queue": {"path": str(spool)}})):
            started = time.monotonic()
            r = runner.run_once(world, case, "mta", new, sessions, size, root / f"run{i + 1}-{label}",
                                mta_overrides=overrides, after_start=_idle)
            results.append(r)
            shown = "ERROR " + r["error"].splitlines()[0] if "error" in r else \
                f"start={r['start_seconds']:.2f}s e2e={r['e2e_rate']:.0f}/s tick={r['idle_ms_per_tick']:.2f}ms"
            print(f"  scale run {i + 1} {label:7} {time.monotonic() - started:5.1f}s  {shown}", flush=True)
        left = count_backlog(spool)
        if left != deferred:
            notes.append(f"scale run {i + 1}: backlog has {left} messages, expected {deferred} untouched")
    return rows(deferred, new, gen_seconds, ticks, empty, loaded, notes)


def _med(runs: list[dict[str, Any]], key: str) -> float | None:
    return runner.median_or_none([r[key] for r in runs if r.get(key) is not None])


def rows(deferred: int, new: int, gen_seconds: float, ticks: dict[str, float], empty: list[dict[str, Any]],
         loaded: list[dict[str, Any]], notes: list[str]) -> tuple[list[list[str]], list[str]]:
    d, n = f"{deferred:,}", f"{new:,}"

    def row(label: str, value: float | None, fmt: str = "{:.2f}", ratio: str = "-") -> list[str]:
        return ["scale", label, "n/a" if value is None else fmt.format(value), "n/a", ratio]

    ratios = [b["e2e_rate"] / a["e2e_rate"] for a, b in zip(empty, loaded, strict=False)
              if "e2e_rate" in a and "e2e_rate" in b]
    ratio = runner.median_or_none(ratios)
    verdict = "n/a" if ratio is None else ("PASS" if ratio >= REQUIRED else "FAIL")
    out = [
        row(f"backlog written ({d} deferred, set-up) (s)", gen_seconds, "{:.1f}"),
        row("restart to listening, empty queue (s)", _med(empty, "start_seconds")),
        row(f"restart to listening, {d} deferred (s)", _med(loaded, "start_seconds")),
        row(f"resume scan as logged, {d} deferred (s)", _med(loaded, "resume_seconds")),
        row("RSS after start, empty queue (MB)", _med(empty, "rss_after_start_mb"), "{:.1f}"),
        row(f"RSS after start, {d} deferred (MB)", _med(loaded, "rss_after_start_mb"), "{:.1f}"),
        row("scheduler tick in process, empty heap (ms CPU)", ticks.get("tick_ms_empty"), "{:.3f}"),
        row(f"scheduler tick in process, {d} in heap (ms CPU)", ticks.get("tick_ms_loaded"), "{:.3f}"),
        row("idle relay CPU per tick interval, empty queue (ms)", _med(empty, "idle_ms_per_tick"), "{:.3f}"),
        row(f"idle relay CPU per tick interval, {d} deferred (ms)", _med(loaded, "idle_ms_per_tick"), "{:.3f}"),
        row(f"{n} new: end-to-end rate, empty queue (msg/s)", _med(empty, "e2e_rate"), "{:.0f}"),
        row(f"{n} new: end-to-end rate, {d} deferred (msg/s)", _med(loaded, "e2e_rate"), "{:.0f}"),
        row(f"{n} new: submission rate, {d} deferred (msg/s)", _med(loaded, "submit_rate"), "{:.0f}"),
        row(f"{n} new: peak RSS, {d} deferred (MB)", _med(loaded, "peak_rss_mb"), "{:.1f}"),
        row(f"{n} new: e2e rate {d} deferred / empty (need >= {REQUIRED:.2f})", ratio, "{:.2f}", verdict),
    ]
    for r in empty + loaded:
        if "error" in r:
            notes.append("scale: FAILED: " + r["error"].strip()[:1500])
    return out, notes
