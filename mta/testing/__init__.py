"""mta.testing: a simulated Internet on loopback for testing mail setups that use mta (issue 16).

Install with ``pip install mta[testing]``; pytest then offers the ``mta_world`` fixture with no
conftest (see README, "Testing your own setup with mta"). Parts, usable on their own too:

- ``world.World``: DNS, a test CA, MX hosts, MTA-STS policy hosts and real ``mta serve`` relays.
- ``fake_dns.FakeDns`` / ``Zone``, ``fake_mx.FakeMx``, ``policy_server.PolicyServer``,
  ``pki.TestPki``, ``relay.RelayProcess``.
- ``sandbox``: ``mta sandbox``, a world with demo domains and a relay for trying mta by hand.

Layering: this package may import the rest of mta; nothing else in mta imports it (the ``mta
sandbox`` command loads it only when run), so ``import mta`` never needs trustme or pytest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mta.testing.world import World

__all__ = ["World"]


def __getattr__(name: str) -> Any:
    # Lazy, so `import mta.testing` (e.g. by the pytest plugin's package) stays cheap.
    if name == "World":
        from mta.testing.world import World

        return World
    raise AttributeError(name)
