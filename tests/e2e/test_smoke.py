"""The shortest end-to-end path: submit -> spool -> MX lookup -> STARTTLS -> delivered."""

from __future__ import annotations

from tests.support.world import World


def test_submit_and_deliver_with_tls(world: World) -> None:
    mx = world.mx_host("mx1.dst.test", "127.0.0.21")
    world.domain("dst.test", [(10, "mx1.dst.test")])
    relay = world.relay()
    qid = world.submit(relay, ["bob@dst.test"])
    [msg] = mx.wait_for_messages_blocking(1, timeout=10)
    assert msg.rcpt_tos == ["bob@dst.test"] and msg.tls_version in ("TLSv1.2", "TLSv1.3")
    [ev] = relay.wait_event("delivered", queue_id=qid)
    assert ev["tls"] == msg.tls_version and ev["verified"] is True and ev["mx"] == "mx1.dst.test"
    assert relay.stop() == 0
