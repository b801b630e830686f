"""SIGKILL during a burst of submissions: every 250-acknowledged message is in the spool exactly once.

Delivery is pointed at a DNS server that does not answer, so nothing leaves the spool and the
count after restart is exact. (Delivery-side crash rounds live in test_crash_delivery.py.)
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path

from tests.support.burst import burst
from tests.support.relay import RelayProcess, base_config, deep_merge, listen_address, run_cli, write_config

MSG = b"Subject: burst\r\n\r\n" + (b"x" * 78 + b"\r\n") * 25


def test_sigkill_during_burst_loses_nothing_acknowledged(tmp_path: Path) -> None:
    data = deep_merge(base_config(tmp_path), {"dns": {"nameservers": ["127.0.0.9"], "port": 5399, "timeout": "200ms"},
                                              "delivery": {"retry_intervals": ["1h"]}})
    config = write_config(tmp_path, data)
    host, port = listen_address(data)
    acked: list[str] = []
    rng = random.Random(7)
    for _round in range(3):
        relay = RelayProcess(config, data).start()

        async def round_trip(relay: RelayProcess = relay) -> None:
            task = asyncio.ensure_future(burst(host, port, acked, time.monotonic() + 1.5,
                                               message=MSG, clients=10, sender="s@src.test"))
            await asyncio.sleep(0.3 + rng.random() * 0.8)
            relay.kill()  # SIGKILL mid-burst
            await task

        asyncio.run(round_trip())
    assert len(acked) > 50, "the burst should have been acknowledged many times"
    relay = RelayProcess(config, data).start()
    try:
        listing = run_cli(config, "queue", "list", "--json")
        assert listing.returncode == 0, listing.stderr
        ids = [m["id"] for m in json.loads(listing.stdout)]
    finally:
        assert relay.stop() == 0
    assert len(ids) == len(set(ids))
    missing = set(acked) - set(ids)
    assert not missing, f"{len(missing)} acknowledged messages lost"
    spool = Path(data["queue"]["path"])
    assert list((spool / "tmp").iterdir()) == []
