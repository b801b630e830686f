"""Moved to `mta.testing.fake_mx` (issue 16): one world implementation, public for users' tests.

Kept so `from tests.support.fake_mx import ...` in the suite and in branches still landing keeps working;
new code imports from mta.testing directly.
"""

from mta.testing.fake_mx import *  # noqa: F403
from mta.testing.fake_mx import (  # noqa: F401  (names `*` skips or that tests import explicitly)
    MAILBOX_FULL,
    STALL_SECONDS,
    TOO_MANY_RECIPIENTS,
    USER_UNKNOWN,
    FakeMx,
    MxSession,
    ReceivedMessage,
    _FakeSmtp,
    _Handler,
)
