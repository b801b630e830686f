"""`python -m mta.healthcheck` (the image's HEALTHCHECK, issue 19) against a real `mta serve`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from mta.healthcheck import probe_address
from tests.support.relay import base_config, running, write_config


def health(config: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mta.healthcheck", "--config", str(config), "--timeout", "2"],
                          capture_output=True, text=True, timeout=20, env=env)


def test_ctr_6_probe_address_reaches_wildcards_on_loopback() -> None:
    assert probe_address("0.0.0.0:2525") == ("127.0.0.1", 2525)
    assert probe_address("[::]:2525") == ("::1", 2525)
    assert probe_address("127.0.0.9:26") == ("127.0.0.9", 26)


def test_ctr_6_healthcheck_passes_while_serving_and_fails_after(tmp_path: Path) -> None:
    data = base_config(tmp_path)
    config = write_config(tmp_path, data)
    with running(config, data) as relay:
        ok = health(config)
        assert (ok.returncode, ok.stderr) == (0, "")
        assert relay.stop() == 0
    down = health(config)
    assert down.returncode == 1
    assert down.stderr.startswith(f"unhealthy: SMTP {data['submission']['listen'][0]}: ConnectionRefusedError")
