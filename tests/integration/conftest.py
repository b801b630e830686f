"""Fixtures shared by the integration tests."""

from tests.support.postgres import own_pg, pg_server, pg_url

__all__ = ["own_pg", "pg_server", "pg_url"]  # PostgreSQL for the cluster tests (issue 15)
