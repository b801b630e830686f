"""Long crash-and-restart soak of `mta serve` (see tests/support/soak.py).

    .venv/bin/python bench/crash_soak.py --rounds 30
    .venv/bin/python bench/crash_soak.py --rounds 100 --powercut   # power cuts (needs FUSE)
prints: mode=M rounds=R acked=A delivered=D lost=L duplicates=X ...
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.soak import run_soak


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--powercut", action="store_true",
                    help="cut the power (tests/support/lazyfs.py) instead of only SIGKILLing the relay")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = run_soak(Path(tmp), args.rounds, seed=args.seed, clients=args.clients, drain_timeout=300,
                          powercut=args.powercut)
    print(result.line())
    if result.leftovers:
        print("leftovers:", result.leftovers)
    return 1 if result.lost or result.leftovers else 0


if __name__ == "__main__":
    raise SystemExit(main())
