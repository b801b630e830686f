"""Moved to `mta.testing.relay` (issue 16): one world implementation, public for users' tests.

Kept so `from tests.support.relay import ...` in the suite and in branches still landing keeps working;
new code imports from mta.testing directly.
"""

from mta.testing.relay import *  # noqa: F403
from mta.testing.relay import (  # noqa: F401  (names `*` skips or that tests import explicitly)
    RelayProcess,
    _toml_value,
    base_config,
    deep_merge,
    dump_toml,
    free_port,
    listen_address,
    run_cli,
    running,
    wait_port,
    write_config,
)
