"""CPU time and memory of a process tree, read from /proc (Linux only).

Rule: a relay is measured as its whole process tree (Postfix is ~10 cooperating processes, mta is
one), with the same arithmetic for both:

- CPU: sum over the tree of utime + stime + cutime + cstime. A child that exited and was reaped
  moves its time into its parent's cutime/cstime, so the sum never loses or double-counts time
  between two snapshots (as long as the root itself lives).
- Memory: sampled every `interval` seconds; the peak of the tree's summed RSS and of its summed
  PSS (proportional set size: shared library pages are divided among the processes that map
  them, so ten Postfix daemons are not charged ten times for libc). Single-process peaks are also
  exact via VmHWM, which the sampler keeps for the root.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    return raw[raw.rfind(")") + 2 :].split()


def machine_cpu() -> tuple[int, int]:
    """(steal, total) ticks of the whole machine from /proc/stat: the share of steal between two
    readings is CPU time the hypervisor gave to other guests while we wanted it."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    return fields[7], sum(fields)


def children_map() -> dict[int, list[int]]:
    """ppid -> [pid] for every process on the machine."""
    out: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = _stat_fields(int(name))
        if fields is not None:
            out.setdefault(int(fields[1]), []).append(int(name))
    return out


def tree(root: int) -> list[int]:
    """`root` and all its descendants (bounded by the number of processes on the machine)."""
    kids = children_map()
    out, todo = [], [root]
    while todo and len(out) < 100_000:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime + cutime + cstime of `pids`, in seconds (see the module rule)."""
    total = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            # fields[0] is field 3 (state): utime..cstime are fields 14..17 -> indexes 11..14.
            total += sum(int(x) for x in fields[11:15])
    return total / TICKS


def tree_cpu(root: int) -> float:
    return cpu_seconds(tree(root))


def own_cpu(pid: int) -> float:
    """utime + stime of one process alone (its threads, not its children), in seconds."""
    fields = _stat_fields(pid)
    return 0.0 if fields is None else sum(int(x) for x in fields[11:13]) / TICKS


def _status_kb(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def rss_mb(pid: int) -> float:
    return _status_kb(pid, "VmRSS") / 1024


def hwm_mb(pid: int) -> float:
    """Peak RSS of one process since it started (VmHWM)."""
    return _status_kb(pid, "VmHWM") / 1024


@dataclass
class MemoryPeak:
    rss_mb: float = 0.0  # peak of the tree's summed RSS
    pss_mb: float = 0.0  # peak of the tree's summed PSS
    root_hwm_mb: float = 0.0  # VmHWM of the root process
    samples: int = 0


class Sampler:
    """Samples a process tree's memory in a daemon thread until stop()."""

    def __init__(self, root: int, interval: float = 0.25, max_seconds: float = 3600.0) -> None:
        self.root = root
        self.interval = interval
        self.max_samples = int(max_seconds / interval) + 1
        self.peak = MemoryPeak()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="procstat-sampler", daemon=True)

    def sample(self) -> None:
        pids = tree(self.root)
        rss = sum(_status_kb(p, "VmRSS") for p in pids) / 1024
        pss = sum(_pss_kb(p) for p in pids) / 1024
        peak = self.peak
        peak.rss_mb = max(peak.rss_mb, rss)
        peak.pss_mb = max(peak.pss_mb, pss)
        peak.root_hwm_mb = max(peak.root_hwm_mb, hwm_mb(self.root))
        peak.samples += 1

    def _run(self) -> None:
        for _ in range(self.max_samples):
            self.sample()
            if self._stop.wait(self.interval):
                return

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> MemoryPeak:
        self._stop.set()
        self._thread.join(5)
        self.sample()  # one last look, so a short run still has a figure
        return self.peak
