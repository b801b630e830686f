"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.fake_mx import FakeMx
from tests.support.postgres import own_pg, pg_server, pg_url
from tests.support.submission import Server, start_server

__all__ = ["own_pg", "pg_server", "pg_url"]  # PostgreSQL for the cluster tests (issue 15)


@pytest.fixture
async def make_server(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """In-process submission listeners on 127.0.0.1 (a module may override it with its own defaults)."""
    started: list[Server] = []

    async def make(**sub: Any) -> Server:
        srv = await start_server(tmp_path / f"q{len(started)}", tmp_path, **{"listen": ["127.0.0.1:0"], **sub})
        started.append(srv)
        return srv

    yield make
    for srv in started:
        await srv.listeners.stop()


@pytest.fixture
async def fake_mx(request: pytest.FixtureRequest) -> AsyncIterator[Callable[..., Any]]:
    """Fake MX hosts on the test module's `ADDR`, stopped at the end of the test."""
    address = request.module.ADDR
    started: list[FakeMx] = []

    async def make(**kwargs: Any) -> FakeMx:
        mx = await FakeMx(address, **kwargs).start()
        started.append(mx)
        return mx

    yield make
    for mx in started:
        await mx.stop()


@pytest.fixture
async def sts_world(tmp_path: Path) -> AsyncIterator[Any]:
    """test_sts_service's world: fake DNS, one HTTPS policy host, cache files closed at the end."""
    from tests.integration.test_sts_service import SERVER_IP, World
    from tests.support.fake_dns import FakeDns
    from tests.support.pki import TestPki
    from tests.support.policy_server import PolicyServer

    pki = TestPki(tmp_path / "pki")
    with FakeDns() as fake_dns:
        async with PolicyServer(pki, SERVER_IP) as server:
            w = World(tmp_path, pki, fake_dns, server)
            yield w
            for cache in w.caches:
                await cache.close()
