"""mta.metrics and the HTTP endpoint's pure parts: forwarding, label sets, queue gauges, tokens."""

from __future__ import annotations

import pytest

from mta import config, metrics
from mta.errors import ConfigError
from mta.http.server import check_token, token_required
from mta.spool.store import id_created, new_id


def sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


async def test_ops_2_forwarded_counts_apply_once_in_the_parent() -> None:
    """The child buffers the increments of one loop turn into one line; the parent applies it once."""
    lines: list[str] = []
    received = sample("mta_messages_received_total", listener="smtp:1")
    connections = sample("mta_smtp_connections", listener="smtp:1")
    metrics.forward_to(lines.append)
    try:
        metrics.message_received("smtp:1")
        metrics.message_received("smtp:1")
        metrics.connection_opened("smtp:1")
        metrics.connection_opened("smtp:1")
        metrics.connection_closed("smtp:1")
        metrics.flush_forwarded()
        metrics.flush_forwarded()  # nothing new: no line
    finally:
        metrics.forward_to(None)
    assert len(lines) == 1 and lines[0].startswith(metrics.FORWARD_PREFIX) and lines[0].endswith("\n")
    # Buffered in the "child": nothing counted locally.
    assert sample("mta_messages_received_total", listener="smtp:1") == received
    metrics.apply_forwarded(lines[0][len(metrics.FORWARD_PREFIX):].strip())
    assert sample("mta_messages_received_total", listener="smtp:1") == received + 2
    assert sample("mta_smtp_connections", listener="smtp:1") == connections + 1


@pytest.mark.parametrize("junk", ["", "not json", "[[1,2]]", '[["no_such_metric", [], 1]]',
                                  '[["mta_messages_received", [], 1]]'])
def test_ops_2_malformed_forwarded_line_is_ignored(junk: str) -> None:
    metrics.apply_forwarded(junk)  # logged, never raised into the pipe reader


def test_ops_1_label_values_come_from_fixed_sets() -> None:
    before = sample("mta_sts_failures_total", result_type="other")
    metrics.sts_failure("evil.example.com")
    assert sample("mta_sts_failures_total", result_type="other") == before + 1
    before = sample("mta_messages_rejected_total", code="other")
    metrics.message_rejected("hello")
    assert sample("mta_messages_rejected_total", code="other") == before + 1
    before = sample("mta_tls_sessions_total", version="other", verified="no")
    metrics.tls_session("TLSv9 from a hostile peer", False)
    assert sample("mta_tls_sessions_total", version="other", verified="no") == before + 1
    before = sample("mta_deliveries_total", result="delivered", policy="dane", sts_mode="none")
    metrics.delivery("delivered", None, policy="dane")
    assert sample("mta_deliveries_total", result="delivered", policy="dane", sts_mode="none") == before + 1


def test_ops_1_lookup_source_labels() -> None:
    cases = [("fetched", False, "fetch"), ("cache", True, "cache"), ("override", False, "override"),
             ("none", False, "none"), ("none", True, "error")]
    for source, failed, label in cases:
        before = sample("mta_sts_policy_lookups_total", source=label)
        metrics.sts_lookup(source, failed=failed)
        assert sample("mta_sts_policy_lookups_total", source=label) == before + 1


def test_ops_3_queue_gauges() -> None:
    a, b, c, d, e = (new_id(t) for t in (100.0, 50.0, 10.0, 200.0, 250.0))  # ids sort by arrival
    states, oldest = metrics.queue_gauges({a: 290.0, b: 400.0, d: 300.0}, {e}, {c}, 300.0, id_created)
    assert states == {"active": 3, "deferred": 1, "hold": 1}  # a and d due, e in flight; b later; c held
    assert oldest == 290.0  # c, held, arrived at 10
    states, oldest = metrics.queue_gauges({a: 290.0, b: 400.0}, set(), set(), 300.0, id_created)
    assert oldest == 250.0  # b
    assert metrics.queue_gauges({}, set(), set(), 300.0, lambda q: 0.0) == (
        {"active": 0, "deferred": 0, "hold": 0}, 0.0)


def test_ops_5_token_rules() -> None:
    assert not token_required("127.0.0.1:8025", "")
    assert not token_required("[::1]:8025", "")
    assert token_required("127.0.0.1:8025", "secret-secret-secret")  # enforced whenever set
    assert token_required("0.0.0.0:8025", "")
    assert token_required("192.0.2.1:8025", "")
    # Off loopback without a configured token: the API is closed (403), whatever is sent.
    error = check_token("Bearer anything", "", True)
    assert error is not None and error.status == 403
    assert check_token(None, "", False) is None
    token = "0123456789abcdef0123"
    assert check_token(f"Bearer {token}", token, True) is None
    assert check_token(f"bearer  {token} ", token, True) is None
    for header in (None, "", "Bearer", f"Basic {token}", "Bearer wrong", f"Bearer {token}0", "Bearer é"):
        error = check_token(header, token, True)
        assert error is not None and error.status == 401, header


@pytest.mark.parametrize(("http", "message"), [
    ({"listen": "localhost:8025"}, "<config>: http.listen: 'localhost:8025' is not an IP:port address"),
    ({"listen": "127.0.0.1"}, "<config>: http.listen: '127.0.0.1' is not an IP:port address"),
    ({"admin_token": "short-secret"}, "<config>: http.admin_token: must be at least 16 printable characters"),
    ({"admin_token": "a secret with spaces in it"}, "<config>: http.admin_token: must be at least 16 printable"),
])
def test_ops_5_http_config_errors_name_the_key_never_the_token(http: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.from_dict({"http": http})
    assert str(info.value).startswith(message)
    if "admin_token" in http:
        assert http["admin_token"] not in str(info.value)


def test_ops_1_counting_is_off_without_the_endpoint() -> None:
    before = sample("mta_dkim_signatures_total", algorithm="ed25519-sha256")
    metrics.set_enabled(False)
    try:
        metrics.dkim_signed("ed25519-sha256")
    finally:
        metrics.set_enabled(True)
    assert sample("mta_dkim_signatures_total", algorithm="ed25519-sha256") == before
    metrics.dkim_signed("ed25519-sha256")
    assert sample("mta_dkim_signatures_total", algorithm="ed25519-sha256") == before + 1
