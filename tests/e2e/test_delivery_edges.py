"""Delivery edge cases through a real `mta serve` that the main scenario files leave out:
null MX against a cached policy (NMX-5), no caching of a 5xx to MAIL (SMTP-24), the shorter
lifetime of our own DSNs (SMTP-36)."""

from __future__ import annotations

from tests.e2e.test_delivery import queue
from tests.support.world import World


def test_nmx_5_null_mx_wins_over_a_cached_enforce_policy(world: World) -> None:
    """An enforce policy is cached for the domain; then its MX becomes a null MX: the next message
    bounces at once with 5.1.10 (the reason is the null MX, never a policy deferral)."""
    mx = world.mx_host("mx1.dst.test", "127.0.0.30")
    world.domain("dst.test", [(10, "mx1.dst.test")])
    world.sts("dst.test", "enforce", ["mx1.dst.test"])
    relay = world.relay()
    first = world.submit(relay, ["a@dst.test"])
    [ev] = relay.wait_event("delivered", queue_id=first)
    assert ev["sts_mode"] == "enforce"
    world.zone.remove("dst.test", "MX")
    world.zone.add("dst.test", "MX", "0 .")
    second = world.submit(relay, ["b@dst.test"])
    [ev] = relay.wait_event("bounced", queue_id=second)
    assert ev["status"] == "5.1.10"
    assert not relay.events("deferred") and len(mx.messages) == 1


def test_smtp_24_permanent_reply_to_mail_is_not_cached(world: World) -> None:
    """A 553 to MAIL FROM bounces the first message; the next message from the same sender to the
    same MX (on the reused connection) sends MAIL again and is delivered."""
    mx = world.mx_host("mx1.dst.test", "127.0.0.31", replies={"MAIL": "553 5.7.1 sender rejected"})
    world.domain("dst.test", [(10, "mx1.dst.test")])
    relay = world.relay(world.config(delivery={"connection_reuse_time": "30s"}))
    first = world.submit(relay, ["a@dst.test"])
    [ev] = relay.wait_event("bounced", queue_id=first)
    assert ev["status"] == "5.7.1"
    del mx.replies["MAIL"]
    second = world.submit(relay, ["b@dst.test"])
    relay.wait_event("delivered", queue_id=second)
    assert sum(s.verbs.count("MAIL") for s in mx.sessions) == 2
    assert [m.rcpt_tos for m in mx.messages] == [["b@dst.test"]]


def test_smtp_36_our_dsn_gives_up_after_bounce_lifetime_without_a_notice(world: World) -> None:
    """A bounce whose own delivery keeps failing (the sender's MX answers 451) is dropped after
    delivery.bounce_lifetime (2 s here), long before max_queue_lifetime, and produces no DSN."""
    world.zone.add("gone.test", "MX", "0 .")
    world.sender_mx.replies["RCPT"] = "451 4.3.0 try later"
    relay = world.relay(world.config(delivery={"retry_intervals": ["1s"], "bounce_lifetime": "2s",
                                               "max_queue_lifetime": "1h"}))
    qid = world.submit(relay, ["a@gone.test"])
    relay.wait_event("bounced", queue_id=qid)
    bounced = relay.wait_event("bounced", count=2, timeout=20)
    [dsn_event] = [e for e in bounced if e["queue_id"] != qid]
    assert dsn_event["recipient"] == "alice@src.test" and dsn_event["status"] == "5.4.7"
    assert queue(relay) == []  # the DSN is gone, and no DSN about the DSN was queued (SMTP-38)
    assert world.sender_mx.messages == []
