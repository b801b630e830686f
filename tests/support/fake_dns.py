"""Moved to `mta.testing.fake_dns` (issue 16): one world implementation, public for users' tests.

Kept so `from tests.support.fake_dns import ...` in the suite and in branches still landing keeps working;
new code imports from mta.testing directly.
"""

from mta.testing.fake_dns import *  # noqa: F403
from mta.testing.fake_dns import (  # noqa: F401  (names `*` skips or that tests import explicitly)
    MAX_CHAIN,
    TCP_IDLE,
    FakeDns,
    Query,
    Reply,
    Zone,
    _name,
    _recv_exact,
    _type,
)
