"""One measured run: start a relay (mta or Postfix) for a case, load it, measure, stop it.

Rule: both relays get the same treatment in the same order of steps:
1. start with an empty queue in a fresh folder; 2. one warm-up message, waited for at the sink
   (fills mta's DNS cache and, for MTA-STS, its policy cache: "warm cache"); 3. CPU baseline and
   memory sampler; 4. t0, then `smtp-source` with SESSIONS-1 sessions plus the latency probe as the
   last session, N messages in all; 5. submission ends when both exit; 6. end-to-end ends at the
   sink's timestamp of message N; CPU is read right then; 7. stop, and check the relay's own log
   says every message was delivered.

Figures: submission rate = N / (submission end - t0); end-to-end rate = N / (last at sink - t0);
latency p50/p99 from the probe; CPU s per 1,000 = tree CPU delta * 1000 / N; memory peaks from
procstat.Sampler. Every wait is bounded (see `budget`).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import diskflush
import procstat
from postfix import PostfixRelay
from world import DNS_IP, TLS_MX, World, free_port_on, wait_port

from tests.support.relay import RelayProcess, deep_merge, write_config

SOURCE = "/usr/sbin/smtp-source"
SENDER = "bench@source.test"
HELO = "source.test"
HELD = 0.5  # seconds: a submission held this long was paced, not served (held_pct)


@dataclass(frozen=True)
class Case:
    name: str
    domain: str  # recipient domain
    tls_sink: bool  # delivered to bench/sink.py (STARTTLS) rather than smtp-sink
    reuse: bool  # submission: many messages per connection (smtp-source -d)
    mta: dict[str, Any] = field(default_factory=dict)  # config overrides; "{sink_port}" is filled in
    postfix_tls: str = "may"  # smtp_tls_security_level
    postfix_main: dict[str, str] = field(default_factory=dict)  # further main.cf settings
    note: str = ""


CASES: dict[str, Case] = {c.name: c for c in (
    Case("plain-reuse", "plain.test", False, True, note="plaintext delivery leg, many messages per connection"),
    Case("plain-1pc", "plain.test", False, False, note="plaintext delivery leg, one message per connection"),
    Case("tls-verify", "tls.test", True, True,
         {"delivery": {"relayhost": TLS_MX + ":{sink_port}", "relayhost_tls": "verify"}}, "secure",
         note="verified TLS: mta relayhost_tls=verify / Postfix secure, match=" + TLS_MX),
    Case("sts-enforce", "sts.test", True, True, {"mta_sts": {"enabled": True}}, "secure",
         note="MTA-STS enforce, warm cache / Postfix static secure policy (what a resolver returns)"),
    # One message per submission connection, as the issue 18 measurements ran every leg: the
    # submission side then costs the same as in plain-1pc, so the two differ only in delivery.
    Case("sts-enforce-1pc", "sts.test", True, False, {"mta_sts": {"enabled": True}}, "secure",
         note="as sts-enforce, one message per submission connection"),
    # Postfix at its best TLS setting (issue 18): one TLS connection carries many deliveries.
    Case("sts-enforce-pfreuse", "sts.test", True, True, {"mta_sts": {"enabled": True}}, "secure",
         {"smtp_tls_connection_reuse": "yes"},
         note="as sts-enforce, Postfix with smtp_tls_connection_reuse = yes (its tlsproxy keeps TLS open)"),
    Case("sts-none", "nosts.test", True, True, {"mta_sts": {"enabled": True}}, "may",
         note="same destination without a policy: opportunistic STARTTLS"),
)}


def _fill(value: Any, port: int) -> Any:
    if isinstance(value, dict):
        return {k: _fill(v, port) for k, v in value.items()}
    if isinstance(value, str):
        return value.replace("{sink_port}", str(port))
    return value


def mta_config(run_dir: Path, port: int, world: World, case: Case) -> dict[str, Any]:
    """Product defaults except what the benchmark world needs (and log format json, to count)."""
    queue = run_dir / "queue"
    data: dict[str, Any] = {
        "hostname": "relay.test",
        "submission": {"listen": [f"127.0.0.1:{port}"]},
        "queue": {"path": str(queue)},
        "delivery": {"smtp_port": world.sink_port},
        "dns": {"nameservers": [DNS_IP], "port": world.dns.port},
        "tls": {"ca_file": str(world.pki.ca_file)},
        "mta_sts": {"enabled": False, "https_port": world.policy.port, "cache_path": str(queue / "sts-cache.db")},
        "tlsrpt": {"enabled": False, "db_path": str(queue / "tlsrpt.db")},
        "log": {"format": "json", "level": "info"},
    }
    return deep_merge(data, _fill(case.mta, world.sink_port))


class MtaRelay:
    kind = "mta"

    #: When set, `mta serve` runs under cProfile and writes <profile_dir>/<run folder>.prof on exit.
    profile_dir: Path | None = None
    #: Config keys set on every mta run (relay_bench --mta-set), e.g. {"queue": {"group_commit": False}}.
    extra: ClassVar[dict[str, Any]] = {}

    def __init__(self, run_dir: Path, world: World, case: Case, overrides: dict[str, Any] | None = None) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir = run_dir
        self.port = free_port_on("127.0.0.1")
        self.data = deep_merge(deep_merge(mta_config(run_dir, self.port, world, case), self.extra), overrides or {})
        self.proc = RelayProcess(write_config(run_dir, self.data), self.data)

    def start(self) -> int:
        if self.profile_dir is None:
            self.proc.start()
        else:
            # Same as RelayProcess.start, with cProfile in front of `-m mta serve`.
            self.profile_dir.mkdir(parents=True, exist_ok=True)
            out = self.profile_dir / f"{self.run_dir.name}.prof"
            with open(self.proc.log_path, "ab") as log:
                self.proc.proc = subprocess.Popen(
                    [sys.executable, "-m", "cProfile", "-o", str(out), "-m", "mta", "serve", "--config",
                     str(self.proc.config)], stdout=log, stderr=log, env=dict(os.environ, PYTHONUNBUFFERED="1"))
            wait_port("127.0.0.1", self.port, 20)
        assert self.proc.proc is not None
        return self.proc.proc.pid

    def stop(self) -> None:
        try:
            self.proc.stop(timeout=30)
        except Exception:
            self.proc.kill()

    def delivered(self) -> int:
        return len(self.proc.events("delivered"))

    def log_tail(self) -> str:
        return self.proc.log_text()[-3000:]

    def problems(self) -> str:
        """The relay's own account of undelivered mail: counts and a few reasons."""
        bad = self.proc.events("deferred") + self.proc.events("bounced")
        reasons = "; ".join(sorted({str(e.get("reply") or e.get("reason")) for e in bad})[:3])
        return f"mta log: {self.delivered()} delivered, {len(bad)} deferred/bounced {reasons}"


class PostfixHandle:
    kind = "postfix"
    #: main.cf settings on every Postfix run (relay_bench --postfix-set), e.g. {"in_flow_delay": "0s"}.
    extra: ClassVar[dict[str, str]] = {}

    def __init__(self, run_dir: Path, world: World, case: Case) -> None:
        self.port = free_port_on("127.0.0.1")
        sink_ip = world.sink(case.tls_sink).host
        self.pf = PostfixRelay(run_dir / "postfix", ("127.0.0.1", self.port), {case.domain: (sink_ip, world.sink_port)},
                               tls=case.postfix_tls, ca_file=str(world.pki.ca_file), cert_match=TLS_MX,
                               extra={**case.postfix_main, **self.extra})

    def start(self) -> int:
        self.pf.start()
        pid = self.pf.master_pid()
        assert pid is not None
        return pid

    def stop(self) -> None:
        self.pf.stop()

    def delivered(self) -> int:
        return self.pf.count_log("status=sent")

    def log_tail(self) -> str:
        return self.pf.log_tail(3000)

    def problems(self) -> str:
        """Postfix's own account of undelivered mail: counts and a few log lines."""
        lines = self.pf.grep_log(("status=deferred", "status=bounced", "lost connection", "timed out"), 4)
        lines += self.pf.grep_log(("warning:",), 2)
        return f"postfix log: {self.delivered()} sent; " + " | ".join(lines)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def budget(n: int) -> float:
    """Seconds allowed for one phase of a run: generous (50 messages/s), but bounded."""
    return 60.0 + n / 50.0


def _probe_cmd(port: int, count: int, size: int, reuse: bool, rcpt: str) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).with_name("probe.py")), "--host", "127.0.0.1", "--port", str(port),
           "--count", str(count), "--size", str(size), "--to", rcpt, "--from", SENDER, "--helo", HELO]
    return [*cmd, "--reuse"] if reuse else cmd


def run_once(world: World, case: Case, kind: str, n: int, sessions: int, size: int, run_dir: Path, *,
             mta_overrides: dict[str, Any] | None = None,
             after_start: Callable[[int, Any], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Measure one relay on one case; returns the figures (or {"error": ...}).

    `after_start(root_pid, relay)` runs once the relay listens, before the warm-up; what it
    returns is added to the figures (the scale case measures idle cost there).
    """
    relay: MtaRelay | PostfixHandle
    relay = MtaRelay(run_dir, world, case, mta_overrides) if kind == "mta" else PostfixHandle(run_dir, world, case)
    sink = world.sink(case.tls_sink)
    rcpt = f"rcpt@{case.domain}"
    extra: ClassVar[dict[str, Any]] = {}
    try:
        t_start = time.monotonic()
        root = relay.start()
        extra["start_seconds"] = time.monotonic() - t_start
        if after_start is not None:
            extra.update(after_start(root, relay))
        # 2. warm-up
        before, _, _ = sink.snapshot()
        warm = subprocess.run(_probe_cmd(relay.port, 1, size, True, rcpt), capture_output=True, text=True, timeout=60)
        if warm.returncode != 0 or not sink.wait_for(before + 1, 60):
            return {"error": f"warm-up message not delivered: {warm.stderr[-500:]}\n{relay.log_tail()}"}
        # 3. baselines
        c0, tls0, _ = sink.snapshot()
        cpu0 = procstat.tree_cpu(root)
        main0 = procstat.own_cpu(root)
        sink_cpu0 = procstat.tree_cpu(sink.proc.pid)
        disk = diskflush.Meter(run_dir).start()  # before the sampler: it sleeps to learn the background
        sampler = procstat.Sampler(root).start()
        steal0 = procstat.machine_cpu()
        probe_n = max(1, n // sessions)
        src_cmd = [SOURCE, "-s", str(max(1, sessions - 1)), "-m", str(n - probe_n), "-l", str(size), "-f", SENDER,
                   "-t", rcpt, "-M", HELO, "-C", "5"] + (["-d"] if case.reuse else []) + [f"127.0.0.1:{relay.port}"]
        # 4. load
        t0 = time.monotonic()
        src = subprocess.Popen(src_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        probe = subprocess.Popen(_probe_cmd(relay.port, probe_n, size, case.reuse, rcpt), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        try:
            probe_out, probe_err = probe.communicate(timeout=budget(n))
            t_probe = time.monotonic()
            _, src_err = src.communicate(timeout=max(1.0, budget(n) - (t_probe - t0)))
            t_sub = time.monotonic()
        except subprocess.TimeoutExpired:
            src.kill()
            probe.kill()
            src.wait()
            probe.wait()
            sampler.stop()
            return {"error": f"submission did not finish within {budget(n):.0f} s\n{relay.log_tail()}"}
        t_sub = max(t_sub, t_probe)
        if src.returncode != 0 or probe.returncode != 0:
            sampler.stop()
            return {"error": f"submission failed: smtp-source rc={src.returncode} {src_err[-300:]} "
                             f"probe rc={probe.returncode} {probe_err[-300:]}\n{relay.log_tail()}"}
        # 6. end to end
        done = sink.wait_for(c0 + n, budget(n))
        cpu1 = procstat.tree_cpu(root)
        main1 = procstat.own_cpu(root)
        steal1 = procstat.machine_cpu()
        disk_flushes, background = disk.stop()
        sink_cpu = procstat.tree_cpu(sink.proc.pid) - sink_cpu0
        peak = sampler.stop()
        c1, tls1, last = sink.snapshot()
        if not done:
            return {"error": f"only {c1 - c0} of {n} messages reached the sink within {budget(n):.0f} s; "
                             f"{relay.problems()}\n{relay.log_tail()}"}
        lat = json.loads(probe_out)["latencies"]
        if disk_flushes is not None:
            extra["flushes_per_msg"] = disk_flushes / n
        submit_rate = n / (t_sub - t0)
        result = {
            "submit_rate": submit_rate,
            "e2e_rate": n / (last - t0),
            "p50_ms": percentile(lat, 50) * 1000,
            "p99_ms": percentile(lat, 99) * 1000,
            # What a median hides: the probe's mean; the held share, messages kept waiting half a
            # second or more (Postfix's in_flow_delay); and the mean over ALL sessions, which in a
            # closed loop is sessions / rate (Little's law). The probe is one light client beside
            # smtp-source's one busy process, so where the OS favours it (a process per session,
            # as in Postfix) its mean falls below the all-session mean (bench/README.md).
            "mean_ms": statistics.fmean(lat) * 1000 if lat else float("nan"),
            "held_pct": 100 * sum(1 for v in lat if v >= HELD) / max(1, len(lat)),
            "all_mean_ms": sessions / submit_rate * 1000,
            "peak_rss_mb": peak.rss_mb,
            "peak_pss_mb": peak.pss_mb,
            "cpu_per_1k": (cpu1 - cpu0) * 1000 / n,
            # Split of the same figure: the root process alone (mta: scheduler and delivery;
            # Postfix: master) and every other process of the tree (mta: the submission child).
            "cpu_main_per_1k": (main1 - main0) * 1000 / n,
            "cpu_rest_per_1k": (cpu1 - cpu0 - (main1 - main0)) * 1000 / n,
            "latency_samples": len(lat),
            # A virtual machine's cores can be taken by other guests: a run with much steal is slower
            # for reasons outside both relays (the spread between runs of one leg).
            "steal_pct": 100 * (steal1[0] - steal0[0]) / max(1, steal1[1] - steal0[1]),
            "tls_share": (tls1 - tls0) / max(1, c1 - c0),
            "seconds": last - t0,
            # A sink busy most of the run would make it, not the relay, the bottleneck.
            "sink_cpu_share": sink_cpu / max(1e-9, last - t0),
            "background_flush_rate": background,
            **extra,
        }
    except Exception as exc:  # one broken run must not stop the others; its reason is reported
        return {"error": f"{type(exc).__name__}: {exc}\n{relay.log_tail()}"}
    finally:
        relay.stop()
    # 7. the relay's own account must match the sink's
    delivered = relay.delivered()
    if delivered < n + 1:
        result["warning"] = f"relay log shows {delivered} deliveries for {n + 1} messages"
    return result


def median_or_none(values: list[float]) -> float | None:
    return statistics.median(values) if values else None
