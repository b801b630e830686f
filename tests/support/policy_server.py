"""Moved to `mta.testing.policy_server` (issue 16): one world implementation, public for users' tests.

Kept so `from tests.support.policy_server import ...` in the suite and in branches still landing keeps working;
new code imports from mta.testing directly.
"""

from mta.testing.policy_server import *  # noqa: F403
from mta.testing.policy_server import (  # noqa: F401  (names `*` skips or that tests import explicitly)
    CERT_KINDS,
    JSON_PATH,
    TXT_PATH,
    Behaviour,
    PolicyServer,
    Request,
    _Host,
    make_padded_policy,
)
