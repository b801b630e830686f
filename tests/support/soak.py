"""Crash-and-restart soak: submit and deliver while killing `mta serve` at random moments.

Used by tests/e2e/test_crash_delivery.py and test_powercut.py (few rounds) and bench/crash_soak.py
(many rounds). Each submitted message carries a unique token; after the last round the relay runs
until the queue is empty and we compare what got 250 with what the receiving MX saw.

Two modes:
- SIGKILL only: both relay processes (parent and listener child) are killed; the page cache
  survives, so this cannot see a missing flush.
- power cut (`powercut=True`): spool, policy cache and TLS-RPT database live on the power-loss
  file system (tests/support/lazyfs.py); at the random moment the power is cut (everything not
  fsync'ed is gone), the processes are killed, the file system remounted from what a real disk
  would hold, and the relay restarted on it.

A duplicate is explained when its copies arrived on both sides of a cut (delivered, then killed
before the state write was durable); one inside a single run of the relay is a bug.
"""

from __future__ import annotations

import asyncio
import collections
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiosmtplib

from tests.support.dkim import make_key
from tests.support.fake_mx import FakeMx
from tests.support.powercut import LazyFs, kill_all, stop_all
from tests.support.relay import RelayProcess, listen_address, write_config
from tests.support.world import World


@dataclass
class SoakResult:
    rounds: int
    acked: int
    delivered: int
    lost: int
    duplicates: int
    leftovers: list[str]
    mode: str = "sigkill"
    unexplained_duplicates: int = 0  # two copies within one run of the relay: never allowed
    duplicate_window: float = 0.0  # longest time from a duplicate's first copy to the cut after it (s)
    lost_ids: list[str] = field(default_factory=list)  # queue ids of acknowledged, undelivered mail
    corrupt: list[str] = field(default_factory=list)  # file names the relay moved to corrupt/

    def line(self) -> str:
        return (f"mode={self.mode} rounds={self.rounds} acked={self.acked} delivered={self.delivered} "
                f"lost={self.lost} duplicates={self.duplicates} corrupt={len(self.corrupt)}"
                f" duplicate_window={self.duplicate_window:.2f}s")


async def _submit(host: str, port: int, acked: dict[str, str], stop_at: list[float], clients: int,
                  seq: list[int]) -> None:
    """Clients submit until stop_at[0] (which the round may move on)."""
    async def client() -> None:
        while time.monotonic() < stop_at[0]:
            try:
                async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=5) as c:
                    while time.monotonic() < stop_at[0]:
                        seq[0] += 1
                        token = f"tok{seq[0]:07d}"
                        body = f"Subject: {token}\r\nX-Token: {token}\r\n\r\n".encode() + (b"y" * 70 + b"\r\n") * 28
                        _errors, reply = await c.sendmail("s@src.test", ["bob@dst.test"], body)
                        m = re.search(r"queued as (\w+)", reply)
                        acked[token] = m.group(1) if m else "?"  # only after the 250
            except (aiosmtplib.SMTPException, OSError):
                await asyncio.sleep(0.05)

    await asyncio.gather(*(client() for _ in range(clients)))


def _tokens(mx: FakeMx) -> list[tuple[str, float]]:
    """(token, arrival time) of every message the MX accepted, in order."""
    out = []
    for msg in list(mx.messages):
        for line in msg.data.split(b"\r\n"):
            if line.startswith(b"X-Token: "):
                out.append((line[9:].decode(), msg.received_at))
    return out


def run_soak(tmp: Path, rounds: int, *, seed: int = 1, clients: int = 8, round_seconds: float = 1.5, min_acks: int = 0,
             drain_timeout: float = 60.0, powercut: bool = False, writeback: float = 0.0,
             start_timeout: float = 10.0, group_commit: bool = True) -> SoakResult:
    rng = random.Random(seed)
    world = World(tmp)
    fs: LazyFs | None = None
    try:
        mx = world.mx_host("mx1.dst.test", "127.0.0.21")
        world.domain("dst.test", [(10, "mx1.dst.test")])
        world.sts("dst.test", "enforce", ["mx1.dst.test"])
        extra: dict[str, object] = {"delivery": {"retry_intervals": ["1s"]}, "queue": {"group_commit": group_commit}}
        if powercut:
            fs = LazyFs(tmp / "disk", tmp / "mnt").mount()
            queue = fs.mountpoint / "queue"
            extra.update(queue={"path": str(queue), "group_commit": group_commit},
                         mta_sts={"cache_path": str(queue / "sts-cache.db")},
                         tlsrpt={"enabled": True, "db_path": str(queue / "tlsrpt.db"), "record_all_sessions": True,
                                 "contact_info": "mailto:tlsrpt@src.test", "report_sender": "tlsrpt@src.test"},
                         # RPT-18: report mails need a DKIM key of the reporting domain
                         dkim={"keys": [make_key(tmp / "keys", "src.test", "rpt").config()]})
        data = world.config(**extra)
        spool = Path(data["queue"]["path"])
        host, port = listen_address(data)
        acked: dict[str, str] = {}
        seq = [0]
        epochs = [0]  # len(mx.messages) at each cut: a duplicate must straddle one
        cut_times: list[float] = []
        config = write_config(tmp, data)

        def start() -> RelayProcess:
            relay = RelayProcess(config, data)
            world.relays.append(relay)  # killed by world.close() whatever happens
            return relay.start(timeout=start_timeout)  # a loaded machine may take long to start one

        for _ in range(rounds):
            relay = start()

            async def one_round(relay: RelayProcess = relay) -> None:
                before, stop_at = len(acked), [time.monotonic() + round_seconds]
                task = asyncio.ensure_future(_submit(host, port, acked, stop_at, clients, seq))
                # A random moment: during DATA, right after a 250, mid-delivery or mid-state-write;
                # with min_acks not before that many 250s (a loaded machine starts slowly).
                await asyncio.sleep(rng.uniform(0.1, round_seconds))
                give_up = time.monotonic() + 10
                while len(acked) - before < min_acks and time.monotonic() < give_up:
                    stop_at[0] = max(stop_at[0], time.monotonic() + 0.5)
                    await asyncio.sleep(0.02)
                assert relay.proc is not None
                if fs is not None:
                    stop_all(relay.proc)  # the power goes: the processes stand still ...
                    fs.freeze_and_cut(writeback, rng.randrange(1 << 30))  # ... the disk keeps what was flushed
                cut_times.append(time.time())
                kill_all(relay.proc)  # both processes (parent and listener child) die
                await task

            asyncio.run(one_round())
            time.sleep(0.2)  # the MX finishes a DATA the dead relay had fully sent
            epochs.append(len(mx.messages))
            if fs is not None:
                fs.unmount()
                fs.mount()  # the next boot
        relay = start()
        deadline = time.monotonic() + drain_timeout
        while time.monotonic() < deadline:
            # The queue is empty when no envelope is left (what `mta queue list` reads), checked
            # directly: a CLI run costs seconds on this shared machine.
            # (<id>.msg since issue 18, <id>.json in the old format)
            if not any(p.name.endswith((".msg", ".json")) for p in (spool / "msg").iterdir()):
                break
            time.sleep(0.2)
        relay.stop()
        leftovers = [p.name for d in ("tmp", "msg") for p in (spool / d).iterdir()]
        corrupt = sorted(p.name for p in (spool / "corrupt").iterdir())
        arrivals = _tokens(mx)
        tokens = [t for t, _ in arrivals]
        seen = collections.Counter(tokens)
        lost_tokens = set(acked) - set(seen)
        dups = sum(n - 1 for n in seen.values() if n > 1)
        return SoakResult(rounds, len(acked), len(set(seen) & set(acked)), len(lost_tokens), dups, leftovers,
                          mode="powercut" if powercut else "sigkill",
                          unexplained_duplicates=_unexplained(tokens, epochs),
                          duplicate_window=_window(arrivals, seen, cut_times),
                          lost_ids=sorted(acked[t] for t in lost_tokens), corrupt=corrupt)
    finally:
        world.close()
        if fs is not None:
            fs.unmount()


def _window(arrivals: list[tuple[str, float]], seen: collections.Counter[str], cut_times: list[float]) -> float:
    """How long before a cut the first copy of a duplicated message arrived, at most."""
    first: dict[str, float] = {}
    for token, at in arrivals:
        first.setdefault(token, at)
    gaps = [min((c for c in cut_times if c >= first[t]), default=first[t]) - first[t]
            for t, n in seen.items() if n > 1]
    return max(gaps, default=0.0)


def _unexplained(tokens: list[str], epochs: list[int]) -> int:
    """Extra copies of a token that arrived in the same run of the relay as an earlier copy."""
    run_of = [sum(1 for e in epochs[1:] if i >= e) for i in range(len(tokens))]
    seen: set[tuple[str, int]] = set()
    bad = 0
    for token, run in zip(tokens, run_of, strict=True):
        if (token, run) in seen:
            bad += 1
        seen.add((token, run))
    return bad
