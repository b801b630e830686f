"""Scale case (issue 18 target 4, PERF-4): a spool holding 1,000,000 deferred messages (mta only).

Rule: the deferred messages are written in the spool's current one-file format (msg/<id>.msg) by
mta.testing.backlog.write_backlog: the first through SpoolStore's own put, the rest as copies with
their id replaced, one sync(2) at the end instead of an fsync per file (set-up, not a measured
figure). `--scale-dir` puts the backlog (and the empty-queue relay's spool, so both runs write to
the same file system) elsewhere, e.g. /dev/shm. Then, per run:

1. empty queue: a fresh relay takes NEW messages (20 sessions, 2 KB, many per connection, to
   smtp-sink): the reference end-to-end rate; its idle CPU before the load is the baseline tick.
2. loaded queue, during the scan: a relay started on the backlog: time from exec to listening
   (the envelope scan runs after the listener opens), RSS then; the same NEW messages at once,
   while the backlog is still being read (informational).
3. loaded queue, after the scan: a relay started on the backlog again; listening time; then it
   waits for the `resume` finished event (time from exec to the end of the scan), RSS then and
   idle CPU per scheduler tick; then the same NEW messages while the backlog stays deferred.
4. The loaded (after the scan) end-to-end rate must be at least 90% of the empty-queue rate
   (issue 18), and the backlog must still be all there, untouched, afterwards. RSS <= 250 MB.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import procstat
import runner
from world import World

from mta.scheduler import CTL_POLL, Scheduler
from mta.spool.store import SpoolStore
from mta.testing.backlog import WEEK, write_backlog

IDLE_SECONDS = 10.0  # /proc CPU has 10 ms resolution: 10 s / CTL_POLL ticks -> 0.25 ms per tick
TICK_SECONDS = 3.0
REQUIRED = 0.90
RSS_LIMIT_MB = 250.0
SCAN_WAIT = 900.0  # seconds the loaded run waits for the background scan to finish


def build_backlog(path: Path, count: int, size: int) -> float:
    """Write `count` deferred messages into a spool at `path`; returns the seconds it took."""
    started = time.monotonic()
    write_backlog(path, count, size)
    return time.monotonic() - started


def count_backlog(path: Path) -> int:
    return sum(1 for e in os.scandir(SpoolStore(path).msg) if e.name.endswith(".msg"))


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


def _resume_event(relay: Any) -> dict[str, Any] | None:
    done = [e for e in relay.proc.events("resume") if e.get("state") == "finished"]
    return done[-1] if done else None


def _at_listen(root: int, relay: Any) -> dict[str, Any]:
    """Loaded run during the scan: RSS right at listening, then load at once."""
    return {"rss_after_start_mb": procstat.rss_mb(root)}


def _idle(root: int, relay: Any) -> dict[str, Any]:
    """After start-up: wait for the background scan (loaded runs), then the idle cost: CPU per
    scheduler tick, RSS, what the relay logged."""
    t0 = time.monotonic()
    out: dict[str, Any] = {"rss_after_start_mb": procstat.rss_mb(root)}
    deadline = t0 + SCAN_WAIT
    done = _resume_event(relay)
    while done is None and time.monotonic() < deadline:
        time.sleep(0.25)
        done = _resume_event(relay)
    if done is not None:
        out["scan_after_listen_s"] = time.monotonic() - t0  # polled: +-0.25 s
        out["scan_logged_s"] = done.get("seconds")
        out["scan_scheduled"] = done.get("scheduled")
    time.sleep(1.0)  # let start-up work settle
    out["rss_after_scan_mb"] = procstat.rss_mb(root)
    out["tree_rss_after_scan_mb"] = sum(procstat.rss_mb(p) for p in procstat.tree(root))
    cpu0 = procstat.tree_cpu(root)
    time.sleep(IDLE_SECONDS)
    cpu = procstat.tree_cpu(root) - cpu0
    out.update({"idle_ms_per_tick": cpu * 1000 / (IDLE_SECONDS / CTL_POLL), "idle_cpu_pct": cpu * 100 / IDLE_SECONDS})
    started = relay.proc.events("started")
    if started:
        out["queued_at_start"] = started[-1].get("queued")
    return out


def run(world: World, root: Path, *, deferred: int, new: int, runs: int, sessions: int, size: int,
        deadline: float, spool_dir: Path | None = None) -> tuple[list[list[str]], list[str]]:
    """Measure the scale case; returns table rows (case | metric | mta | postfix | ratio) and notes."""
    if spool_dir is not None:
        spool_dir.mkdir(parents=True, exist_ok=True)
        base = Path(tempfile.mkdtemp(prefix="mta-scale-", dir=spool_dir))
        try:
            return _run(world, root, base, deferred=deferred, new=new, runs=runs, sessions=sessions, size=size,
                        deadline=deadline)
        finally:
            shutil.rmtree(base, ignore_errors=True)
    return _run(world, root, root, deferred=deferred, new=new, runs=runs, sessions=sessions, size=size,
                deadline=deadline)


def _run(world: World, root: Path, base: Path, *, deferred: int, new: int, runs: int, sessions: int, size: int,
         deadline: float) -> tuple[list[list[str]], list[str]]:
    base.mkdir(parents=True, exist_ok=True)
    spool = base / "backlog"
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
    scanning: list[dict[str, Any]] = []
    loaded: list[dict[str, Any]] = []
    notes: list[str] = []
    for i in range(runs):
        if time.monotonic() > deadline:
            notes.append("scale: stopped early (--max-minutes)")
            break
        phases = (("empty", empty, {"queue": {"path": str(base / f"empty{i + 1}")}}, _idle),
                  ("scanning", scanning, {"queue": {"path": str(spool)}}, _at_listen),
                  ("loaded", loaded, {"queue": {"path": str(spool)}}, _idle))
        for label, results, overrides, hook in phases:
            started = time.monotonic()
            r = runner.run_once(world, case, "mta", new, sessions, size, root / f"run{i + 1}-{label}",
                                mta_overrides=overrides, after_start=hook)
            results.append(r)
            shown = "ERROR " + r["error"].splitlines()[0] if "error" in r else \
                (f"start={r['start_seconds']:.2f}s e2e={r['e2e_rate']:.0f}/s rss={r['rss_after_start_mb']:.0f}MB "
                 f"peak={r['peak_rss_mb']:.0f}MB" + (f" scan_done={r['start_seconds'] + r['scan_after_listen_s']:.1f}s"
                                                      if "scan_after_listen_s" in r else ""))
            print(f"  scale run {i + 1} {label:8} {time.monotonic() - started:5.1f}s  {shown}", flush=True)
        left = count_backlog(spool)
        if left != deferred:
            notes.append(f"scale run {i + 1}: backlog has {left} messages, expected {deferred} untouched")
    return rows(deferred, new, gen_seconds, ticks, empty, scanning, loaded, notes)


def _med(runs: list[dict[str, Any]], key: str) -> float | None:
    return runner.median_or_none([r[key] for r in runs if r.get(key) is not None])


def rows(deferred: int, new: int, gen_seconds: float, ticks: dict[str, float], empty: list[dict[str, Any]],
         scanning: list[dict[str, Any]], loaded: list[dict[str, Any]], notes: list[str]
         ) -> tuple[list[list[str]], list[str]]:
    d, n = f"{deferred:,}", f"{new:,}"

    def row(label: str, value: float | None, fmt: str = "{:.2f}", ratio: str = "-") -> list[str]:
        return ["scale", label, "n/a" if value is None else fmt.format(value), "n/a", ratio]

    def ratio_of(runs: list[dict[str, Any]]) -> float | None:
        return runner.median_or_none([b["e2e_rate"] / a["e2e_rate"] for a, b in zip(empty, runs, strict=False)
                                      if "e2e_rate" in a and "e2e_rate" in b])

    ratio, during = ratio_of(loaded), ratio_of(scanning)
    verdict = "n/a" if ratio is None else ("PASS" if ratio >= REQUIRED else "FAIL")
    scan_done = runner.median_or_none([r["start_seconds"] + r["scan_after_listen_s"] for r in loaded
                                       if "scan_after_listen_s" in r])
    listen = runner.median_or_none([r["start_seconds"] for r in scanning + loaded if "start_seconds" in r])
    peak = max((r["peak_rss_mb"] for r in scanning + loaded if "peak_rss_mb" in r), default=None)
    after = _med(loaded, "tree_rss_after_scan_mb")
    worst = max((v for v in (peak, after) if v is not None), default=None)
    out = [
        row(f"backlog written ({d} deferred, set-up) (s)", gen_seconds, "{:.1f}"),
        row("exec to listening, empty queue (s)", _med(empty, "start_seconds")),
        row(f"exec to listening, {d} deferred (s) (need <= 5)", listen, "{:.2f}",
            "n/a" if listen is None else ("PASS" if listen <= 5 else "FAIL")),
        row(f"exec to end of the background scan, {d} deferred (s)", scan_done, "{:.1f}"),
        row(f"background scan as logged, {d} deferred (s)", _med(loaded, "scan_logged_s"), "{:.1f}"),
        row("RSS at listening, empty queue (MB)", _med(empty, "rss_after_start_mb"), "{:.1f}"),
        row(f"RSS at listening, {d} deferred (MB)", _med(scanning + loaded, "rss_after_start_mb"), "{:.1f}"),
        row(f"RSS after the scan, {d} deferred: server / all processes (MB)", _med(loaded, "rss_after_scan_mb"),
            "{:.1f}" + (f" / {after:.1f}" if after is not None else "")),
        row(f"peak RSS of all processes, {n} new beside {d} deferred (MB) (need <= {RSS_LIMIT_MB:.0f})", worst,
            "{:.1f}", "n/a" if worst is None else ("PASS" if worst <= RSS_LIMIT_MB else "FAIL")),
        row("scheduler tick in process, empty heap (ms CPU)", ticks.get("tick_ms_empty"), "{:.3f}"),
        row(f"scheduler tick in process, {d} scheduled (ms CPU)", ticks.get("tick_ms_loaded"), "{:.3f}"),
        row("idle relay CPU per tick interval, empty queue (ms)", _med(empty, "idle_ms_per_tick"), "{:.3f}"),
        row(f"idle relay CPU per tick interval, {d} deferred (ms)", _med(loaded, "idle_ms_per_tick"), "{:.3f}"),
        row(f"{n} new: end-to-end rate, empty queue (msg/s)", _med(empty, "e2e_rate"), "{:.0f}"),
        row(f"{n} new: end-to-end rate, {d} deferred, during the scan (msg/s)", _med(scanning, "e2e_rate"), "{:.0f}",
            "-" if during is None else f"{during:.2f}"),
        row(f"{n} new: end-to-end rate, {d} deferred, after the scan (msg/s)", _med(loaded, "e2e_rate"), "{:.0f}"),
        row(f"{n} new: submission rate, {d} deferred (msg/s)", _med(loaded, "submit_rate"), "{:.0f}"),
        row(f"{n} new: e2e rate {d} deferred / empty (need >= {REQUIRED:.2f})", ratio, "{:.2f}", verdict),
    ]
    for r in empty + scanning + loaded:
        if "error" in r:
            notes.append("scale: FAILED: " + r["error"].strip()[:1500])
    return out, notes
