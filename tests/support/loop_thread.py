"""Moved to `mta.testing.loop_thread` (issue 16): one world implementation, public for users' tests.

Kept so `from tests.support.loop_thread import ...` in the suite and in branches still landing keeps working;
new code imports from mta.testing directly.
"""

from mta.testing.loop_thread import *  # noqa: F403
from mta.testing.loop_thread import (  # noqa: F401  (names `*` skips or that tests import explicitly)
    LoopThread,
)
