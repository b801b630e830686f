"""Moved to `mta.testing.world` (issue 16): one world implementation, public for users' tests.

Kept so `from tests.support.world import ...` in the suite and in branches still landing keeps working;
new code imports from mta.testing directly.
"""

from mta.testing.world import *  # noqa: F403
from mta.testing.world import (  # noqa: F401  (names `*` skips or that tests import explicitly)
    POLICY_ADDRESS,
    World,
    _free_port_on,
)
