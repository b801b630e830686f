"""The pytest plugin of `mta[testing]` (entry point `pytest11`): the `mta_world` fixture (KIT-1).

Registered through the package's entry point, so a user's test file needs no conftest. The world
module (and with it trustme and aiosmtpd) is imported inside the fixture: installing `mta` without
the extra must not break an unrelated pytest run that merely loads this plugin.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from mta.testing.world import World


@pytest.fixture
def mta_world(tmp_path: Path) -> Iterator[World]:
    """A fresh simulated Internet for one test; everything it started stops afterwards, pass or fail (KIT-3)."""
    from mta.testing.world import World

    world = World(tmp_path)
    try:
        yield world
    finally:
        world.close()
