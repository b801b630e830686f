"""The per-host unreachable cache (SMTP-37), pure: time is an argument."""

from __future__ import annotations

import pytest

from mta import config
from mta.delivery.unreachable import UnreachableHosts
from mta.errors import ConfigError

A = ("192.0.2.1", 25)


def test_smtp_37_marked_host_is_skipped_until_the_ttl_lapses() -> None:
    hosts = UnreachableHosts(ttl=300)
    assert not hosts.skipped(A, 1000.0)
    hosts.mark(A, 1000.0)
    assert hosts.skipped(A, 1000.0) and hosts.skipped(A, 1299.9)
    assert hosts.remaining(A, 1100.0) == pytest.approx(200.0)
    assert not hosts.skipped(A, 1300.0)
    assert len(hosts) == 0 and hosts.remaining(A, 1300.0) == 0.0  # a lapsed entry is dropped


def test_smtp_37_key_is_address_and_port() -> None:
    hosts = UnreachableHosts(ttl=300)
    hosts.mark(A, 0.0)
    assert not hosts.skipped(("192.0.2.1", 587), 1.0)
    assert not hosts.skipped(("192.0.2.2", 25), 1.0)  # another address of the same MX is still tried


def test_smtp_37_marking_again_extends_and_success_or_flush_forgets() -> None:
    hosts = UnreachableHosts(ttl=300)
    hosts.mark(A, 0.0)
    hosts.mark(A, 200.0)
    assert hosts.skipped(A, 400.0)
    hosts.forget(A)
    assert not hosts.skipped(A, 400.0)
    hosts.mark(A, 400.0)
    hosts.mark(("192.0.2.9", 25), 400.0)
    hosts.clear()  # `mta queue flush` overrides the delay
    assert len(hosts) == 0


def test_smtp_37_bounded_size_evicts_the_oldest_mark() -> None:
    hosts = UnreachableHosts(ttl=300, max_entries=3)
    for i in range(3):
        hosts.mark((f"192.0.2.{i}", 25), float(i))
    hosts.mark(("192.0.2.0", 25), 5.0)  # re-marked: now the newest
    hosts.mark(("192.0.2.7", 25), 6.0)
    assert len(hosts) == 3
    assert not hosts.skipped(("192.0.2.1", 25), 7.0)  # the oldest mark went first
    assert all(hosts.skipped((f"192.0.2.{i}", 25), 7.0) for i in (0, 2, 7))
    for i in range(1000):
        hosts.mark((f"198.51.100.{i}", 25), 10.0)
    assert len(hosts) == 3


def test_smtp_37_zero_ttl_disables_and_bad_arguments_are_refused() -> None:
    hosts = UnreachableHosts(ttl=0)
    hosts.mark(A, 0.0)
    assert not hosts.skipped(A, 0.0) and len(hosts) == 0
    with pytest.raises(ValueError):
        UnreachableHosts(ttl=-1)
    with pytest.raises(ValueError):
        UnreachableHosts(ttl=1, max_entries=0)


def test_smtp_37_dlv_1_config_keys() -> None:
    cfg = config.from_dict({}, "config.toml")
    assert (cfg.delivery.unreachable_time, cfg.delivery.attempt_timeout) == (300.0, 900.0)
    cfg = config.from_dict({"delivery": {"unreachable_time": "0s", "attempt_timeout": "2m"}}, "config.toml")
    assert (cfg.delivery.unreachable_time, cfg.delivery.attempt_timeout) == (0.0, 120.0)
    with pytest.raises(ConfigError, match=r"^config.toml: delivery.attempt_timeout: must be more than 0s$"):
        config.from_dict({"delivery": {"attempt_timeout": "0s"}}, "config.toml")
    with pytest.raises(ConfigError, match=r"delivery.unreachable_time"):
        config.from_dict({"delivery": {"unreachable_time": "soon"}}, "config.toml")
