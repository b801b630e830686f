"""A signal sent to the whole process group (Ctrl-C, systemd's control-group KillMode) reaches the
relay's helpers too: their exit right before our own stop is a stop, not a failure (exit 0)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from mta import config as config_mod
from mta.app import Relay
from tests.support.relay import base_config, write_config


class _FailedScan:
    """The spool scan, killed by the group's signal: it ends without its END line."""

    ok = False

    async def run(self) -> None:
        return None


def _relay(tmp_path: Path) -> Relay:
    cfg = config_mod.load(write_config(tmp_path, base_config(tmp_path)))
    return Relay(cfg)


def test_a_scan_killed_by_the_groups_signal_is_a_stop(tmp_path: Path) -> None:
    async def main() -> None:
        relay = _relay(tmp_path)
        relay.resume = _FailedScan()  # type: ignore[assignment]
        loop = asyncio.get_running_loop()
        loop.call_later(0.1, relay.stop_requested.set)  # our own SIGINT, a moment after the scan's
        await relay._resume()
        assert not relay.failed and not relay.child_gone.is_set()

    asyncio.run(main())


def test_a_scan_that_fails_on_its_own_still_stops_the_relay(tmp_path: Path) -> None:
    async def main() -> None:
        relay = _relay(tmp_path)
        relay.resume = _FailedScan()  # type: ignore[assignment]
        await relay._resume()  # no signal follows within the grace: a real failure (exit 1)
        assert relay.failed and relay.child_gone.is_set()

    asyncio.run(main())
