"""Fixtures for end-to-end scenarios: a whole test world on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.postgres import own_pg, pg_server, pg_url
from tests.support.world import World

__all__ = ["own_pg", "pg_server", "pg_url"]  # PostgreSQL for the cluster tests (issue 15)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    try:
        yield w
    finally:
        w.close()
