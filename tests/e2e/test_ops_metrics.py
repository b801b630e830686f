"""GET /metrics of a real `mta serve` (issue 14): every event counted once, across both processes.

OPS-1: delivery counters move by exactly the expected amount (enforce, testing, no policy, a
bounce, a deferral). OPS-2: submission counts of the listener child reach the parent's scrape,
exactly once. OPS-3: queue gauges follow the scheduler (deferred, hold via the API).
"""

from __future__ import annotations

import smtplib
import time

import pytest

from tests.support.dkim import make_key
from tests.support.fake_mx import USER_UNKNOWN
from tests.support.ops import delta, get_json, labels, scrape, value, wait_up, wait_value
from tests.support.relay import free_port, listen_address
from tests.support.world import World


def ops_config(world: World, **extra: object) -> dict[str, object]:
    data = world.config(http={"listen": f"127.0.0.1:{free_port()}"}, **extra)
    return data


def base_url(data: dict[str, object]) -> str:
    base = f"http://{data['http']['listen']}"  # type: ignore[index]
    wait_up(base)
    return base


def test_ops_1_delivery_counters_move_exactly(world: World) -> None:
    world.mx_host("mx.enf.test", "127.0.0.21")
    world.domain("enf.test", [(10, "mx.enf.test")])
    world.sts("enf.test", "enforce", ["mx.enf.test"])
    world.mx_host("mx.tst.test", "127.0.0.22", cert="wrong-name")
    world.domain("tst.test", [(10, "mx.tst.test")])
    world.sts("tst.test", "testing", ["mx.tst.test"])
    world.mx_host("mx.plain.test", "127.0.0.23")
    world.domain("plain.test", [(10, "mx.plain.test")])
    world.mx_host("mx.gone.test", "127.0.0.24", rcpt_replies={"bob@gone.test": USER_UNKNOWN})
    world.domain("gone.test", [(10, "mx.gone.test")])
    world.mx_host("mx.bad.test", "127.0.0.25", cert="untrusted")
    world.domain("bad.test", [(10, "mx.bad.test")])
    world.sts("bad.test", "enforce", ["mx.bad.test"])
    data = ops_config(world, delivery={"retry_intervals": ["1h"]})  # the deferral is not retried meanwhile
    relay = world.relay(data)
    base = base_url(data)
    before = scrape(base)

    for rcpt in ("bob@enf.test", "bob@tst.test", "bob@plain.test"):
        world.submit(relay, [rcpt])
    world.submit(relay, ["bob@gone.test"], sender="")  # null sender: a bounce without a DSN
    world.submit(relay, ["bob@bad.test"])
    relay.wait_event("delivered", count=3)
    relay.wait_event("bounced", count=1)
    relay.wait_event("deferred", count=1)
    after = wait_value(base, "mta_messages_received_total", 5, listener=f"smtp:{listen_address(data)[1]}")

    assert delta(before, after, "mta_deliveries_total") == {
        labels(result="delivered", policy="mta-sts", sts_mode="enforce"): 1,
        labels(result="delivered", policy="mta-sts", sts_mode="testing"): 1,
        labels(result="delivered", policy="none", sts_mode="none"): 1,
        labels(result="bounced", policy="none", sts_mode="none"): 1,
        labels(result="deferred", policy="mta-sts", sts_mode="enforce"): 1,
    }
    assert delta(before, after, "mta_delivery_attempt_seconds_count") == {
        labels(result="delivered"): 3, labels(result="bounced"): 1, labels(result="deferred"): 1}
    assert delta(before, after, "mta_sts_policy_lookups_total") == {
        labels(source="fetch"): 3, labels(source="none"): 2}
    assert delta(before, after, "mta_sts_failures_total") == {
        labels(result_type="certificate-host-mismatch"): 1,  # testing: delivered, but reported
        labels(result_type="certificate-not-trusted"): 1,  # enforce: deferred
    }
    assert delta(before, after, "mta_tls_sessions_total") == {
        labels(version="TLSv1.3", verified="yes"): 3, labels(version="TLSv1.3", verified="no"): 1}
    assert value(after, "mta_sts_policies_cached") == 3
    # The `deferred` line is logged just before the scheduler takes the message back.
    queued = wait_value(base, "mta_queue_messages", 1, state="deferred")
    assert value(queued, "mta_queue_messages", state="active") == 0
    assert 0 < value(queued, "mta_queue_oldest_message_seconds") < 60
    assert delta(before, after, "mta_messages_rejected_total") == {}
    # Label values never carry a domain or an address.
    assert not any(".test" in v or "@" in v for (_name, lbls) in after for _k, v in lbls)


@pytest.mark.parametrize("separate_process", [True, False])
def test_ops_2_submission_counts_once_across_processes(world: World, separate_process: bool) -> None:
    world.mx_host("mx.dst.test", "127.0.0.26")
    world.domain("dst.test", [(10, "mx.dst.test")])
    data = ops_config(world, submission={"listen": [f"127.0.0.1:{free_port()}"], "separate_process": separate_process,
                                         "auth_failure_delay": "100ms"})
    relay = world.relay(data)
    base = base_url(data)
    host, port = listen_address(data)
    listener = f"smtp:{port}"
    wait_value(base, "mta_smtp_connections", 0, listener=listener)  # the start-up probe is gone
    before = scrape(base)
    for i in range(3):
        world.submit(relay, [f"u{i}@dst.test"])
    with smtplib.SMTP(host, port, timeout=10) as s:
        s.ehlo()
        assert s.mail("a@src.test")[0] == 250
        assert s.rcpt("not an address")[0] == 501
        s.rset()
        assert s.mail("a" * 65 + "@src.test")[0] == 553  # ours (aiosmtpd refuses worse syntax itself)
        # This connection is open: the gauge says so.
        wait_value(base, "mta_smtp_connections", 1, listener=listener)
    wait_value(base, "mta_messages_received_total", 3, listener=listener)
    wait_value(base, "mta_smtp_connections", 0, listener=listener)
    relay.wait_event("delivered", count=3)
    time.sleep(0.3)  # anything counted twice would show up by now
    after = scrape(base)
    assert delta(before, after, "mta_messages_received_total") == {labels(listener=listener): 3}
    assert delta(before, after, "mta_messages_rejected_total") == {labels(code="501"): 1, labels(code="553"): 1}
    assert delta(before, after, "mta_deliveries_total") == {
        labels(result="delivered", policy="none", sts_mode="none"): 3}


def test_ops_3_queue_gauges_follow_hold_and_release(world: World) -> None:
    """A deferred message, held through the API, moves from `deferred` to `hold` and back."""
    world.zone.add("dst.test", "A", "127.0.0.39")  # nothing listens: deferred
    data = ops_config(world, delivery={"retry_intervals": ["1h"], "connect_timeout": "1s"})
    relay = world.relay(data)
    base = base_url(data)
    qid = world.submit(relay, ["bob@dst.test"])
    relay.wait_event("deferred", queue_id=qid)
    wait_value(base, "mta_queue_messages", 1, state="deferred")
    status, body = get_json(base, f"/api/queue/{qid}/hold", method="POST")
    assert (status, body["status"]) == (202, "accepted")
    samples = wait_value(base, "mta_queue_messages", 1, state="hold")
    assert value(samples, "mta_queue_messages", state="deferred") == 0
    status, [entry] = get_json(base, "/api/queue")
    assert entry["id"] == qid and entry["held"] is True
    assert get_json(base, f"/api/queue/{qid}/release", method="POST")[0] == 202
    samples = wait_value(base, "mta_queue_messages", 0, state="hold")
    relay.wait_event("deferred", count=2, queue_id=qid)  # release = retry now


def test_ops_1_dkim_signatures_counted_once_from_the_signing_thread(world: World) -> None:
    """Signing runs in a worker thread of the listener child: each signature still counts once."""
    world.mx_host("mx.dst.test", "127.0.0.27")
    world.domain("dst.test", [(10, "mx.dst.test")])
    rsa = make_key(world.tmp / "keys", "src.test", "mta2026")
    ed = make_key(world.tmp / "keys", "src.test", "ed2026", "ed25519-sha256")
    data = ops_config(world, dkim={"enabled": True, "keys": [rsa.config(), ed.config()]})
    relay = world.relay(data)
    base = base_url(data)
    for i in range(3):
        world.submit(relay, [f"u{i}@dst.test"], body=b"From: alice@src.test\r\nSubject: s\r\n\r\nhi\r\n")
    world.submit(relay, ["v@dst.test"], body=b"From: x@elsewhere.test\r\nSubject: no key\r\n\r\nhi\r\n")
    samples = wait_value(base, "mta_dkim_signatures_total", 3, algorithm="ed25519-sha256")
    relay.wait_event("delivered", count=4)
    time.sleep(0.3)
    after = scrape(base)
    assert delta(samples, after, "mta_dkim_signatures_total") == {}
    assert {k: v for k, v in after.items() if k[0] == "mta_dkim_signatures_total"} == {
        ("mta_dkim_signatures_total", labels(algorithm="rsa-sha256")): 3,
        ("mta_dkim_signatures_total", labels(algorithm="ed25519-sha256")): 3}
