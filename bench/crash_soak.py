"""Long crash-and-restart soak of `mta serve` (see tests/support/soak.py).

    .venv/bin/python bench/crash_soak.py --rounds 30                 # SIGKILL only
    .venv/bin/python bench/crash_soak.py --rounds 100 --powercut     # SIGKILL plus power cut (FUSE)
prints: mode=M rounds=R acked=A delivered=D lost=L duplicates=X corrupt=C duplicate_window=Ws

--powercut puts spool, policy cache and TLS-RPT database on the power-loss file system
(tests/support/lazyfs.py; needs /dev/fuse, Debian's fuse3 and mfusepy). --writeback P lets each
unflushed page reach the disk with probability P before the cut (0: the strictest disk).
--unsafe-skip-fsync dir|file runs the spool without that flush (MTA_UNSAFE_SKIP_FSYNC): a
control that must report lost mail under --powercut.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.soak import run_soak


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--powercut", action="store_true", help="cut the power (FUSE) at every kill")
    ap.add_argument("--writeback", type=float, default=0.0, help="chance an unflushed page survives a cut")
    ap.add_argument("--keep", type=Path, help="run in this folder and keep it (logs, spool) for a post-mortem")
    ap.add_argument("--unsafe-skip-fsync", choices=["dir", "file"], help="control: spool without that flush")
    args = ap.parse_args()
    if args.unsafe_skip_fsync:
        os.environ["MTA_UNSAFE_SKIP_FSYNC"] = args.unsafe_skip_fsync  # inherited by `mta serve`
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        where = args.keep or Path(tmp)
        where.mkdir(parents=True, exist_ok=True)
        result = run_soak(where, args.rounds, seed=args.seed, clients=args.clients, drain_timeout=300,
                          powercut=args.powercut, writeback=args.writeback, start_timeout=120)
    print(result.line() + f" unexplained_duplicates={result.unexplained_duplicates}"
          f" seconds={time.monotonic() - started:.0f}")
    if result.leftovers:
        print("leftovers:", result.leftovers)
    if result.lost_ids:
        print("lost queue ids:", " ".join(result.lost_ids))
    return 1 if result.lost or result.leftovers or result.unexplained_duplicates else 0


if __name__ == "__main__":
    raise SystemExit(main())
