"""Moved to `mta.testing.pki` (issue 16): one world implementation, public for users' tests.

Kept so `from tests.support.pki import ...` in the suite and in branches still landing keeps working;
new code imports from mta.testing directly.
"""

from mta.testing.pki import *  # noqa: F403
from mta.testing.pki import (  # noqa: F401  (names `*` skips or that tests import explicitly)
    Leaf,
    TestPki,
)
