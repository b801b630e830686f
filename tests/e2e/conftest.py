"""Fixtures for end-to-end scenarios: a whole test world on loopback (mta.testing, issue 16)."""

from __future__ import annotations

import pytest

from mta.testing.world import World
from tests.support.postgres import own_pg, pg_server, pg_url

__all__ = ["own_pg", "pg_server", "pg_url"]  # PostgreSQL for the cluster tests (issue 15)


@pytest.fixture
def world(mta_world: World) -> World:
    """The suite's older name for the public `mta_world` fixture: one implementation, not two."""
    return mta_world
