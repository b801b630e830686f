"""A stop request during start-up is a clean stop (CTR-4): `docker stop` right after `docker run`."""

from __future__ import annotations

import signal
from pathlib import Path

from tests.support.relay import (
    RelayProcess,
    base_config,
    deep_merge,
    free_port,
    listen_address,
    wait_port,
    write_config,
)


def test_ctr_4_sigterm_as_soon_as_the_listener_accepts_exits_0(tmp_path: Path) -> None:
    # The HTTP endpoint and MTA-STS make the parent's start-up long enough to land in; the listener
    # child accepts before the parent is done.
    data = deep_merge(base_config(tmp_path), {"http": {"listen": f"127.0.0.1:{free_port()}"},
                                               "mta_sts": {"enabled": True}})
    relay = RelayProcess(write_config(tmp_path, data), data).start(wait=False)
    try:
        wait_port(*listen_address(data), timeout=20)
        assert relay.proc is not None
        relay.proc.send_signal(signal.SIGTERM)
        assert relay.stop(timeout=25) == 0, relay.log_text()
    finally:
        relay.kill()
