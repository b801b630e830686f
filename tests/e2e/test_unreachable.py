"""Dead and hostile MX hosts through a real `mta serve`: the unreachable cache (SMTP-37) and the
overall deadline of one delivery attempt (DLV-1)."""

from __future__ import annotations

import time

from tests.e2e.test_delivery import queue
from tests.support.relay import run_cli
from tests.support.world import World

FAST = {"command_timeout": "1s", "retry_intervals": ["1h"], "unreachable_time": "1h"}


def test_smtp_37_dead_mx_skipped_across_messages_until_flush(world: World) -> None:
    """MX 10 accepts TCP but never greets: the first message pays the greeting timeout and goes to
    MX 20; the next message skips MX 10 without connecting; `mta queue flush` forgets it."""
    dead = world.mx_host("dead.dst.test", "127.0.0.30", stall_greeting=True)
    live = world.mx_host("live.dst.test", "127.0.0.31")
    world.domain("dst.test", [(10, "dead.dst.test"), (20, "live.dst.test")])
    relay = world.relay(world.config(delivery=FAST))
    first = world.submit(relay, ["a@dst.test"])
    [ev] = relay.wait_event("delivered", queue_id=first)
    assert ev["mx"] == "live.dst.test" and len(dead.sessions) == 1
    started = time.monotonic()
    second = world.submit(relay, ["b@dst.test"])
    [ev] = relay.wait_event("delivered", queue_id=second)
    assert ev["mx"] == "live.dst.test"
    assert len(dead.sessions) == 1  # not dialled again
    assert time.monotonic() - started < 1.0  # no greeting timeout paid
    assert run_cli(relay.config, "queue", "flush").returncode == 0
    time.sleep(1.0)  # a running serve acts on ctl/ requests within a second
    third = world.submit(relay, ["c@dst.test"])
    relay.wait_event("delivered", queue_id=third)
    assert len(dead.sessions) == 2  # the flush made it worth a try again
    assert len(live.messages) == 3


def test_smtp_37_sts_81_skipped_host_under_enforce_is_a_deferral(world: World) -> None:
    """Under enforce the only MX is dead: the first message defers on the timeout, the second on the
    skip (no connection); both stay queued as deferred, neither bounces; a flush delivers both
    once the host is back."""
    mx = world.mx_host("mx1.dst.test", "127.0.0.32", stall_greeting=True)
    world.domain("dst.test", [(10, "mx1.dst.test")])
    world.sts("dst.test", "enforce", ["mx1.dst.test"])
    relay = world.relay(world.config(delivery=FAST))
    first = world.submit(relay, ["a@dst.test"])
    relay.wait_event("deferred", queue_id=first)
    second = world.submit(relay, ["b@dst.test"])
    [ev] = relay.wait_event("deferred", queue_id=second)
    assert ev["sts_mode"] == "enforce"
    assert len(mx.sessions) == 1
    by_id = {m["id"]: m["recipients"][0] for m in queue(relay)}
    assert by_id[first]["status"] == by_id[second]["status"] == "deferred"
    assert "skipped" in by_id[second]["last_error"] and "no greeting" in by_id[first]["last_error"]
    assert not relay.events("bounced")
    mx.stall_greeting = False
    assert run_cli(relay.config, "queue", "flush").returncode == 0
    relay.wait_event("delivered", count=2)
    assert sorted(m.rcpt_tos[0] for m in mx.messages) == ["a@dst.test", "b@dst.test"]


def test_dlv_1_attempt_deadline_bounds_a_hostile_mx_list(world: World) -> None:
    """Four MX hosts that greet and then stall at MAIL (2 s each, 8 s in all): with
    attempt_timeout 3s the attempt ends after about 3 s as a deferral naming the deadline."""
    hosts = [world.mx_host(f"mx{i}.dst.test", f"127.0.0.{33 + i}", stall_at="MAIL") for i in range(4)]
    world.domain("dst.test", [(10 * (i + 1), f"mx{i}.dst.test") for i in range(4)])
    relay = world.relay(world.config(delivery={"command_timeout": "2s", "attempt_timeout": "3s",
                                               "retry_intervals": ["1h"]}))
    started = time.monotonic()
    qid = world.submit(relay, ["a@dst.test"])
    relay.wait_event("deferred", queue_id=qid, timeout=10)
    assert time.monotonic() - started < 6.0  # not the 8 s the four hosts would take
    [rcpt] = queue(relay)[0]["recipients"]
    assert rcpt["status"] == "deferred" and "delivery.attempt_timeout" in rcpt["last_error"]
    assert sum(1 for mx in hosts if mx.saw("MAIL")) < 4
    assert not relay.events("bounced")
