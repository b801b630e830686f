"""Relay benchmark: mta against a private Postfix, same machine, same load, same sinks, same run.

Rule: every figure is measured for both relays inside one run (mta and Postfix back to back, the
order alternating between runs), reported as medians over the runs, with the ratio mta/Postfix
taken per run and its median printed. Nothing leaves loopback; every wait is bounded; the whole
benchmark stops early (and says so) once `--max-minutes` is spent.

    .venv/bin/python bench/relay_bench.py                 # N=20000, 3 runs, every case + scale
    .venv/bin/python bench/relay_bench.py --quick         # N=2000, 1 run (smoke check)
    .venv/bin/python bench/relay_bench.py --cases plain-reuse,tls-verify --no-scale

Needs Debian's `postfix` package (smtp-source, smtp-sink, a Postfix to compare with; the system
Postfix service is never started) and root (Postfix's daemons run as `postfix`). Writes the table
to stdout and to bench/results-latest.md. See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for p in (str(ROOT), str(BENCH)):
    if p not in sys.path:
        sys.path.insert(0, p)

import postfix  # noqa: E402
import runner  # noqa: E402
import scale  # noqa: E402
from world import World  # noqa: E402

METRICS = [  # key, label, format
    ("submit_rate", "submission rate (msg/s, fsync'ed)", "{:.0f}"),
    ("e2e_rate", "end-to-end rate (msg/s)", "{:.0f}"),
    ("p50_ms", "submission latency p50 (ms)", "{:.1f}"),
    ("p99_ms", "submission latency p99 (ms)", "{:.1f}"),
    ("mean_ms", "submission latency mean (ms)", "{:.1f}"),
    ("held_pct", "messages held >= 0.5 s (%)", "{:.1f}"),
    ("all_mean_ms", "latency mean, all sessions (sessions / rate, ms)", "{:.1f}"),
    ("peak_rss_mb", "peak RSS, process tree (MB)", "{:.1f}"),
    ("peak_pss_mb", "peak PSS, process tree (MB)", "{:.1f}"),
    ("cpu_per_1k", "CPU s per 1,000 messages", "{:.2f}"),
    ("flushes_per_msg", "disk flushes per message (less background)", "{:.2f}"),
    # mta: its parent process (scheduler + delivery), the rest is the listeners (PERF-5); Postfix: master
    ("cpu_main_per_1k", "of which the root process (mta: delivery) CPU s per 1,000", "{:.2f}"),
    ("steal_pct", "CPU steal by other guests during the run (%)", "{:.1f}"),
]


def machine() -> dict[str, str]:
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        pass
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "nproc": str(os.cpu_count()), "cpu": model,
            "python": platform.python_version(), "kernel": platform.release(),
            "postfix": postfix.version(), "load": loadavg()}


def loadavg() -> str:
    """1/5/15-minute load averages: other work on the machine skews every figure."""
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "?"


def raw_runs(results: dict[str, dict[str, list[dict[str, Any]]]]) -> str:
    """Every run's own figures, for the record (the table shows medians)."""
    keys = [k for k, _, _ in METRICS]
    lines = ["| case | relay | run | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 3)]
    for case, by_kind in results.items():
        for kind, runs in by_kind.items():
            for i, r in enumerate(runs):
                cells = ["FAILED"] * len(keys) if "error" in r else \
                    [f"{r[k]:.2f}" if k in r else "n/a" for k in keys]
                lines.append(f"| {case} | {kind} | {i + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fmt(fmt_: str, value: float | None) -> str:
    return "n/a" if value is None else fmt_.format(value)


def summarise(results: dict[str, dict[str, list[dict[str, Any]]]]) -> tuple[list[list[str]], list[str]]:
    """Rows of case | metric | mta | postfix | ratio, and notes (errors, warnings)."""
    rows: list[list[str]] = []
    notes: list[str] = []
    for case, by_kind in results.items():
        mta_kinds = [k for k in by_kind if k.startswith("mta")] or ["mta"]
        for kind, runs in by_kind.items():
            for i, r in enumerate(runs):
                if "error" in r:
                    notes.append(f"{case} / {kind} run {i + 1}: FAILED: {r['error'].strip()[:1500]}")
                if "warning" in r:
                    notes.append(f"{case} / {kind} run {i + 1}: {r['warning']}")
                if r.get("sink_cpu_share", 0) > 0.7:
                    notes.append(f"{case} / {kind} run {i + 1}: the sink was busy {r['sink_cpu_share']:.0%} "
                                 "of the run (it may be the bottleneck)")
                if r.get("tls_share") is not None and runner.CASES[case].tls_sink and r["tls_share"] < 1.0:
                    notes.append(f"{case} / {kind} run {i + 1}: only {r['tls_share']:.0%} of messages over TLS")
        pf_runs = by_kind.get("postfix", [])
        for mta_kind in mta_kinds:
            mta_runs = by_kind.get(mta_kind, [])
            # --mta-processes 1,2: one block of rows per process count, against the same Postfix runs
            shown = case if mta_kind == "mta" else f"{case} [{mta_kind}]"
            for key, label, f in METRICS:
                m = [r[key] for r in mta_runs if key in r]
                p = [r[key] for r in pf_runs if key in r]
                ratios = [a[key] / b[key] for a, b in zip(mta_runs, pf_runs, strict=False)
                          if key in a and key in b and b[key]]
                rows.append([shown, label, fmt(f, runner.median_or_none(m)), fmt(f, runner.median_or_none(p)),
                             fmt("{:.2f}", runner.median_or_none(ratios))])
    if "sts-enforce" in results and "sts-none" in results:
        # The price of enforcing a policy, per relay: enforce rate / no-policy rate, same run.
        for key, label in (("e2e_rate", "enforce/none end-to-end rate"), ("cpu_per_1k", "enforce/none CPU per msg")):
            cells = []
            for kind in ("mta", "postfix"):
                pairs = zip(results["sts-enforce"].get(kind, []), results["sts-none"].get(kind, []), strict=False)
                cells.append(runner.median_or_none([a[key] / b[key] for a, b in pairs if key in a and key in b]))
            ratio = cells[0] / cells[1] if cells[0] and cells[1] else None
            rows.append(["sts (derived)", label, *(fmt("{:.2f}", v) for v in (cells[0], cells[1], ratio))])
    return rows, notes


# Issue 18's per-leg targets: (metric key, wanted, ratio mta/Postfix unless "own", label).
TARGETS = [
    ("e2e_rate", 1.1, ">=", "end to end >= 1.1x Postfix"),
    ("submit_rate", 1.0, ">=", "durable submission >= 1.0x Postfix"),
    ("p50_ms", 1.0, "<=", "submission p50 <= Postfix's"),
    ("flushes_per_msg", 1.0, "own<=", "mta disk flushes per message <= 1.0"),
]


def target_rows(results: dict[str, dict[str, list[dict[str, Any]]]]) -> list[list[str]]:
    """One PASS/FAIL row per leg and target of issue 18, from the medians of the same runs."""
    rows: list[list[str]] = []
    for case, by_kind in results.items():
        mta_runs, pf_runs = by_kind.get("mta", []), by_kind.get("postfix", [])
        for key, wanted, how, label in TARGETS:
            if how == "own<=":
                value = runner.median_or_none([r[key] for r in mta_runs if key in r])
            else:
                value = runner.median_or_none([a[key] / b[key] for a, b in zip(mta_runs, pf_runs, strict=False)
                                               if key in a and key in b and b[key]])
            if value is None:
                verdict = "n/a"
            else:
                verdict = "PASS" if (value >= wanted if how == ">=" else value <= wanted) else "FAIL"
            rows.append([f"target: {case}", label, fmt("{:.2f}", value), "", verdict])
    return rows


def table(rows: list[list[str]]) -> str:
    head = ["case", "metric", "mta", "postfix", "ratio mta/postfix"]
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(5)]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), sep, *(line(r) for r in rows)])


def write_results(path: Path, args: argparse.Namespace, info: dict[str, str], body: str) -> None:
    header = [
        "# Relay benchmark: latest results", "",
        f"- date: {info['date']}",
        f"- machine: nproc {info['nproc']}, CPU {info['cpu']}, kernel {info['kernel']}",
        f"- python {info['python']}, Postfix {info['postfix']}",
        f"- load average (1/5/15 min) at start: {info['load']}, at end: {loadavg()} "
        "(other processes on the machine share its cores)",
        f"- load: smtp-source, {args.sessions} sessions (one of them the latency probe), "
        f"{args.size}-byte messages, N = {args.n}, runs = {args.runs}"
        + (" (--quick)" if args.quick else ""),
        f"- command: `{' '.join(sys.argv)}`", "",
        "Ratios are mta/Postfix, taken per run, median over runs: above 1 means mta has more of it "
        "(good for rates, bad for latency, memory and CPU). See bench/README.md for the method.", "",
    ]
    path.write_text("\n".join(header) + "\n" + body + "\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--n", type=int, default=20000, help="messages per run (default 20000)")
    ap.add_argument("--runs", type=int, default=3, help="runs per case and relay (default 3)")
    ap.add_argument("--sessions", type=int, default=20, help="concurrent submission sessions (default 20)")
    ap.add_argument("--size", type=int, default=2048, help="message payload bytes (default 2048)")
    ap.add_argument("--cases", default=",".join(runner.CASES), help="comma-separated; default all")
    ap.add_argument("--relays", default="mta,postfix", help="mta, postfix or both (default)")
    ap.add_argument("--quick", action="store_true", help="N=2000, 1 run, smaller scale case")
    ap.add_argument("--no-scale", action="store_true", help="skip the scale case (--scale-deferred in the spool)")
    ap.add_argument("--scale-only", action="store_true", help="only the scale case")
    ap.add_argument("--scale-deferred", type=int, default=100_000)
    ap.add_argument("--scale-new", type=int, default=10_000)
    ap.add_argument("--scale-dir", default="", help="where the scale case's spools go (e.g. /dev/shm); default: "
                    "the work folder")
    ap.add_argument("--max-minutes", type=float, default=60.0, help="stop starting new runs after this")
    ap.add_argument("--workdir", default="", help="where queues go (default: a new folder in /var/tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--mta-processes", default="1",
                    help="mta's [submission] processes; several (e.g. 1,2) run mta once per value in each run, "
                         "as relays mta-p1, mta-p2 (default 1)")
    ap.add_argument("--profile", default="", help="run mta under cProfile; .prof files go to this folder")
    ap.add_argument("--results", default=str(BENCH / "results-latest.md"))
    ap.add_argument("--mta-set", action="append", default=[], metavar="SECTION.KEY=TOML",
                    help="set an mta config key on every mta run, e.g. queue.group_commit=false (repeatable)")
    ap.add_argument("--postfix-set", action="append", default=[], metavar="KEY=VALUE",
                    help="set a main.cf parameter on every Postfix run, e.g. in_flow_delay=0s (repeatable)")
    args = ap.parse_args(argv)
    if any("=" not in item for item in args.postfix_set):
        ap.error("--postfix-set: expected KEY=VALUE")
    if args.quick:
        args.n, args.runs = 2000, 1
        args.scale_deferred, args.scale_new = min(args.scale_deferred, 20_000), min(args.scale_new, 2000)
    if not all(v.isdigit() and int(v) >= 1 for v in args.mta_processes.split(",")):
        ap.error(f"--mta-processes: expected numbers >= 1 separated by commas, got {args.mta_processes!r}")
    unknown = set(args.cases.split(",")) - set(runner.CASES)
    if unknown:
        ap.error(f"unknown case(s) {sorted(unknown)}; known: {list(runner.CASES)}")
    if args.n < args.sessions:
        ap.error("--n must be at least --sessions")
    return args


def mta_settings(items: list[str]) -> dict[str, Any]:
    """`section.key=value` strings (value in TOML syntax) as a nested dict of config overrides."""
    out: dict[str, Any] = {}
    for item in items:
        path, _, value = item.partition("=")
        *sections, key = path.strip().split(".")
        node = out
        for name in sections:
            node = node.setdefault(name, {})
        node[key] = tomllib.loads(f"v = {value}")["v"]
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = postfix.available()
    if missing:
        print(f"relay_bench: {missing}", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("relay_bench: run as root (Postfix's daemons switch to the `postfix` user)", file=sys.stderr)
        return 2
    info = machine()
    if args.profile:
        runner.MtaRelay.profile_dir = Path(args.profile).resolve()
    runner.MtaRelay.extra = mta_settings(args.mta_set)
    runner.PostfixHandle.extra = dict(item.split("=", 1) for item in args.postfix_set)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="mta-bench-", dir="/var/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.max_minutes * 60
    counts = [int(v) for v in args.mta_processes.split(",")]
    # relay name -> mta config overrides (Postfix: none)
    variants: dict[str, dict[str, Any]] = {}
    for kind in ("mta", "postfix"):
        if kind not in args.relays.split(","):
            continue
        if kind == "postfix":
            variants["postfix"] = {}
        elif len(counts) == 1:
            variants["mta"] = {"submission": {"processes": counts[0]}}
        else:
            variants.update({f"mta-p{c}": {"submission": {"processes": c}} for c in counts})
    kinds = list(variants)
    cases = [] if args.scale_only else args.cases.split(",")
    results: dict[str, dict[str, list[dict[str, Any]]]] = {c: {k: [] for k in kinds} for c in cases}
    scale_rows: list[list[str]] = []
    scale_notes: list[str] = []
    stopped_early = ""
    print(f"relay_bench: work folder {workdir}; N={args.n}, runs={args.runs}, cases={cases}", flush=True)
    try:
        with World(workdir / "world") as world:
            for run in range(args.runs):
                for case in cases:
                    order = kinds if run % 2 == 0 else kinds[::-1]
                    for kind in order:
                        if time.monotonic() > deadline:
                            stopped_early = f"stopped early: --max-minutes {args.max_minutes} spent"
                            break
                        run_dir = workdir / f"run{run + 1}-{case}-{kind}"
                        started = time.monotonic()
                        r = runner.run_once(world, runner.CASES[case], "postfix" if kind == "postfix" else "mta",
                                            args.n, args.sessions, args.size, run_dir, mta_overrides=variants[kind])
                        results[case][kind].append(r)
                        shown = "ERROR " + r["error"].splitlines()[0] if "error" in r else \
                            ", ".join(f"{k}={r[k]:.1f}" for k, _, _ in METRICS if k in r)
                        if "cpu_main_per_1k" in r:
                            shown += f", cpu_main={r['cpu_main_per_1k']:.2f}, cpu_rest={r['cpu_rest_per_1k']:.2f}"
                        print(f"  run {run + 1} {case:12} {kind:8} {time.monotonic() - started:5.1f}s  {shown} "
                              f"load {loadavg()}",
                              flush=True)
                        if not args.keep:
                            shutil.rmtree(run_dir, ignore_errors=True)
            if not args.no_scale and "mta" in kinds:
                if time.monotonic() > deadline:
                    stopped_early = f"stopped early: --max-minutes {args.max_minutes} spent (scale case skipped)"
                else:
                    scale_rows, scale_notes = scale.run(world, workdir / "scale", deferred=args.scale_deferred,
                                           new=args.scale_new, runs=args.runs, sessions=args.sessions,
                                           size=args.size, deadline=deadline,
                                           spool_dir=Path(args.scale_dir) if args.scale_dir else None)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    rows, notes = summarise(results)
    notes += scale_notes
    body = table(rows + target_rows(results) + scale_rows)
    if stopped_early:
        notes.insert(0, stopped_early)
    text = body + ("\n\nNotes:\n" + "\n".join(f"- {n}" for n in notes) if notes else "")
    print("\n" + text)
    write_results(Path(args.results), args, info, text + "\n\n## Every run\n\n" + raw_runs(results))
    print(f"\nrelay_bench: wrote {args.results}")
    failed = any("error" in r for by in results.values() for runs in by.values() for r in runs)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
