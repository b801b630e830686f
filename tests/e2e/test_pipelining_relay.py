"""PERF-6 end to end: a real `mta serve` delivering to an MX that offers PIPELINING (aiosmtpd) over
opportunistic TLS: delivered, bounced and deferred recipients each get their outcome, the refused
ones their DSN, and the messages share reused connections."""

from __future__ import annotations

from tests.support.fake_mx import MAILBOX_FULL, USER_UNKNOWN
from tests.support.world import World


def test_perf_6_relay_delivers_bounces_and_defers_over_pipelined_reused_connections(world: World) -> None:
    mx = world.mx_host("mx.pipe.test", pipelining=True,
                       rcpt_replies={"gone@pipe.test": USER_UNKNOWN, "full@pipe.test": MAILBOX_FULL})
    world.domain("pipe.test", [(10, "mx.pipe.test")])
    relay = world.relay(world.config(delivery={"retry_intervals": ["1h"]}))
    qids = []
    for i in range(6):  # one after the other, so each can take the connection the one before left
        qids.append(world.submit(relay, [f"u{i}@pipe.test", "gone@pipe.test", "full@pipe.test"]))
        relay.wait_event("delivered", timeout=20, recipient=f"u{i}@pipe.test")
    delivered = [e for e in relay.events("delivered") if e["recipient"].endswith("@pipe.test")]  # not the DSNs
    bounced = relay.wait_event("bounced", count=6, timeout=20, recipient="gone@pipe.test")
    deferred = relay.wait_event("deferred", count=6, timeout=20, recipient="full@pipe.test")
    assert {e["queue_id"] for e in delivered} == {e["queue_id"] for e in bounced} == set(qids)
    assert {e["queue_id"] for e in deferred} == set(qids)
    assert all(e["status"] == "5.1.1" for e in bounced) and all(e["status"] == "4.2.2" for e in deferred)
    assert sorted(m.rcpt_tos[0] for m in mx.messages) == sorted(f"u{i}@pipe.test" for i in range(6))
    assert all(m.tls_version for m in mx.messages)
    assert len(mx.sessions) < 3  # connections were reused
    world.sender_mx.wait_for_messages_blocking(6, timeout=20)  # one DSN per message for gone@
