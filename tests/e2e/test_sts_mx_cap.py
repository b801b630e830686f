"""Issue 10 item 4 end to end: the SMTP-11 host cap comes after the MTA-STS filter."""

from __future__ import annotations

from tests.support.world import World


def test_issue10_item4_smtp_11_enforce_mx_below_ten_others_gets_the_mail(world: World) -> None:
    """Issue 10 item 4: 11 MX hosts outside an enforce policy are more preferred than the one the
    policy lists (preference 120): the listed one is still tried and takes the mail, instead of
    the domain deferring until it bounces at the queue lifetime. The others are never dialled."""
    decoys = []
    for i in range(1, 12):
        decoys.append(world.mx_host(f"mx{i}.cap.test", f"127.0.0.{20 + i}"))
        world.domain("cap.test", [(i * 10, f"mx{i}.cap.test")])
    listed = world.mx_host("good.cap.test", "127.0.0.35")
    world.domain("cap.test", [(120, "good.cap.test")])
    world.sts("cap.test", "enforce", ["good.cap.test"])
    relay = world.relay()
    qid = world.submit(relay, ["bob@cap.test"])
    [ev] = relay.wait_event("delivered", queue_id=qid)
    assert ev["mx"] == "good.cap.test" and ev["sts_mode"] == "enforce"
    assert len(listed.messages) == 1
    assert all(mx.sessions == [] for mx in decoys)  # STS-74: never dialled
