"""Delivery engine end to end: a real `mta serve` against the loopback test world (RFC 5321/7505/3464)."""

from __future__ import annotations

import email
import email.message
import email.policy
import json
import time
from typing import Any

import pytest

from tests.support.fake_mx import USER_UNKNOWN
from tests.support.relay import RelayProcess, run_cli
from tests.support.world import World


def queue(relay: RelayProcess) -> list[dict[str, Any]]:
    out = run_cli(relay.config, "queue", "list", "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def dsn_fields(raw: bytes) -> tuple[email.message.Message, list[dict[str, str]]]:
    """The DSN and its per-recipient blocks (message/delivery-status part)."""
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    parts = msg.get_payload()
    assert isinstance(parts, list)
    status = next(p for p in parts if p.get_content_type() == "message/delivery-status")
    blocks = status.get_payload()
    assert isinstance(blocks, list)
    return msg, [dict(b.items()) for b in blocks]


def test_smtp_9_23_mx_order_and_fallback(world: World) -> None:
    """MX 10 refuses connections -> MX 20 gets the message in the same attempt."""
    world.zone.add("down.dst.test", "A", "127.0.0.39")  # nothing listens there
    mx20 = world.mx_host("mx20.dst.test", "127.0.0.22")
    world.domain("dst.test", [(10, "down.dst.test"), (20, "mx20.dst.test")])
    relay = world.relay()
    qid = world.submit(relay, ["bob@dst.test"])
    mx20.wait_for_messages_blocking(1, timeout=10)
    [ev] = relay.wait_event("delivered", queue_id=qid)
    assert ev["mx"] == "mx20.dst.test" and ev["attempts"] == 1


def test_smtp_10_equal_preference_spread(world: World) -> None:
    a = world.mx_host("a.dst.test", "127.0.0.23")
    b = world.mx_host("b.dst.test", "127.0.0.24")
    world.domain("dst.test", [(10, "a.dst.test"), (10, "b.dst.test")])
    relay = world.relay(world.config(delivery={"connection_reuse_time": "0s"}))
    for i in range(16):
        world.submit(relay, [f"u{i}@dst.test"])
    relay.wait_event("delivered", count=16)
    assert len(a.messages) + len(b.messages) == 16
    assert a.messages and b.messages  # random order among equals (16 tries: 2 * 0.5^16 chance to fail)


def test_smtp_4_implicit_mx(world: World) -> None:
    mx = world.mx_host("plain.test", "127.0.0.25")  # A record only, no MX
    relay = world.relay()
    world.submit(relay, ["bob@plain.test"])
    [msg] = mx.wait_for_messages_blocking(1, timeout=10)
    assert msg.rcpt_tos == ["bob@plain.test"]


@pytest.mark.req("NMX-2", "DSN-3")
def test_nmx_1_null_mx_bounces_5_1_10_without_connecting(world: World) -> None:
    world.zone.add("nullmx.test", "MX", "0 .")
    world.zone.add("nullmx.test", "A", "127.0.0.26")  # NMX-2: never used
    relay = world.relay()
    qid = world.submit(relay, ["bob@nullmx.test"])
    [ev] = relay.wait_event("bounced", queue_id=qid)
    assert ev["status"] == "5.1.10"
    [dsn] = world.sender_mx.wait_for_messages_blocking(1, timeout=10)
    assert dsn.mail_from == "<>" and dsn.rcpt_tos == ["alice@src.test"]  # DSN-3
    _msg, blocks = dsn_fields(dsn.data)
    assert blocks[0]["Reporting-MTA"] == "dns; relay.test"
    assert blocks[1]["Final-Recipient"] == "rfc822; bob@nullmx.test"
    assert blocks[1]["Action"] == "failed" and blocks[1]["Status"] == "5.1.10"
    assert queue(relay) == []


def test_smtp_2_nxdomain_bounces_5_1_2(world: World) -> None:
    relay = world.relay()
    qid = world.submit(relay, ["bob@nowhere.test"])
    [ev] = relay.wait_event("bounced", queue_id=qid)
    assert ev["status"] == "5.1.2" and ev["attempts"] == 1
    [dsn] = world.sender_mx.wait_for_messages_blocking(1, timeout=10)
    assert dsn_fields(dsn.data)[1][1]["Status"] == "5.1.2"


def test_smtp_3_servfail_defers(world: World) -> None:
    world.zone.set_rcode("broken.test", "SERVFAIL")
    relay = world.relay()
    qid = world.submit(relay, ["bob@broken.test"])
    relay.wait_event("deferred", queue_id=qid)
    [m] = queue(relay)
    [r] = m["recipients"]
    assert r["status"] == "deferred" and r["attempts"] >= 1
    assert "4.4.3" in r["last_error"] and r["next_attempt"]


def test_4xx_then_success_after_flush(world: World) -> None:
    mx = world.mx_host("mx.dst.test", "127.0.0.27", replies={"RCPT": "451 4.3.0 greylisted"})
    world.domain("dst.test", [(10, "mx.dst.test")])
    relay = world.relay(world.config(delivery={"retry_intervals": ["1h"]}))
    qid = world.submit(relay, ["bob@dst.test"])
    relay.wait_event("deferred", queue_id=qid)
    [m] = queue(relay)
    assert m["recipients"][0]["last_error"] == "451 4.3.0 greylisted"
    mx.replies = {}
    out = run_cli(relay.config, "queue", "flush")
    assert out.returncode == 0 and "running server" in out.stdout
    mx.wait_for_messages_blocking(1, timeout=10)  # well before the 1h retry
    relay.wait_event("delivered", queue_id=qid)
    assert queue(relay) == []


@pytest.mark.req("SMTP-17", "DSN-4", "DSN-5", "DSN-7")
def test_smtp_19_mixed_results_and_dsn_fields(world: World) -> None:
    """One RCPT 550 -> only that recipient bounces; one DSN lists it with the remote reply (DSN-4/5/7)."""
    mx = world.mx_host("mx.dst.test", "127.0.0.28", rcpt_replies={"gone@dst.test": USER_UNKNOWN})
    world.domain("dst.test", [(10, "mx.dst.test")])
    relay = world.relay()
    qid = world.submit(relay, ["bob@dst.test", "gone@dst.test", "carol@dst.test"],
                       body=b"Subject: mixed\r\nMessage-ID: <orig@src.test>\r\n\r\nhi\r\n")
    [msg] = mx.wait_for_messages_blocking(1, timeout=10)
    assert sorted(msg.rcpt_tos) == ["bob@dst.test", "carol@dst.test"]  # SMTP-17: one transaction
    relay.wait_event("delivered", count=2, queue_id=qid)
    relay.wait_event("bounced", queue_id=qid)
    [dsn] = world.sender_mx.wait_for_messages_blocking(1, timeout=10)
    top, blocks = dsn_fields(dsn.data)
    assert top["To"] == "alice@src.test" and top["Subject"]
    per_msg, rcpt = blocks[0], blocks[1]
    assert per_msg["Reporting-MTA"] == "dns; relay.test" and "Arrival-Date" in per_msg
    assert rcpt["Final-Recipient"] == "rfc822; gone@dst.test"
    assert rcpt["Action"] == "failed" and rcpt["Status"] == "5.1.1"
    assert rcpt["Remote-MTA"] == "dns; mx.dst.test"
    assert rcpt["Diagnostic-Code"].startswith("smtp; 550 5.1.1")
    assert "Last-Attempt-Date" in rcpt
    parts = top.get_payload()
    assert isinstance(parts, list)
    assert parts[2].get_content_type() == "text/rfc822-headers"
    assert b"Message-ID: <orig@src.test>" in parts[2].as_bytes()


def test_smtp_40_no_dsn_for_null_sender(world: World) -> None:
    mx = world.mx_host("mx.dst.test", "127.0.0.29", rcpt_replies={"gone@dst.test": USER_UNKNOWN})
    world.domain("dst.test", [(10, "mx.dst.test")])
    relay = world.relay()
    qid = world.submit(relay, ["gone@dst.test"], sender="")
    relay.wait_event("bounced", queue_id=qid)
    time.sleep(1.0)
    assert world.sender_mx.messages == []
    assert relay.events("accepted")[1:] == []  # no DSN was even queued
    assert mx.messages == []


def test_smtp_35_lifetime_expiry_bounces_with_last_error(world: World) -> None:
    world.mx_host("mx.dst.test", "127.0.0.30", replies={"RCPT": "450 4.2.0 mailbox busy"})
    world.domain("dst.test", [(10, "mx.dst.test")])
    relay = world.relay(world.config(delivery={"retry_intervals": ["1s"], "max_queue_lifetime": "2s"}))
    qid = world.submit(relay, ["bob@dst.test"])
    [ev] = relay.wait_event("bounced", queue_id=qid, timeout=20)
    assert ev["status"] == "5.4.7" and "mailbox busy" in ev["reply"]
    [dsn] = world.sender_mx.wait_for_messages_blocking(1, timeout=10)
    rcpt = dsn_fields(dsn.data)[1][1]
    assert rcpt["Status"] == "5.4.7" and "450 4.2.0 mailbox busy" in rcpt["Diagnostic-Code"]


def test_connection_reuse_for_next_message(world: World) -> None:
    mx = world.mx_host("mx.dst.test", "127.0.0.31")
    world.domain("dst.test", [(10, "mx.dst.test")])
    relay = world.relay(world.config(delivery={"connection_reuse_time": "10s"}))
    world.submit(relay, ["a@dst.test"])
    mx.wait_for_messages_blocking(1, timeout=10)
    world.submit(relay, ["b@dst.test"])
    mx.wait_for_messages_blocking(2, timeout=10)
    assert len(mx.sessions) == 1
    # The first transaction ended with the reply to the end of data: the second MAIL follows
    # without an RSET (mta.delivery.pool; issue 18).
    assert mx.sessions[0].verbs.count("MAIL") == 2 and not mx.sessions[0].saw("RSET")


def test_smtp_16_broken_tls_falls_back_to_plaintext(world: World) -> None:
    mx = world.mx_host("mx.dst.test", "127.0.0.32", broken_tls=True)
    world.domain("dst.test", [(10, "mx.dst.test")])
    relay = world.relay()
    qid = world.submit(relay, ["bob@dst.test"])
    [msg] = mx.wait_for_messages_blocking(1, timeout=10)
    assert msg.tls_version is None
    [ev] = relay.wait_event("delivered", queue_id=qid)
    assert ev["tls"] == "none" and ev["verified"] is False


def test_opportunistic_tls_records_unverified_certificate(world: World) -> None:
    mx = world.mx_host("mx.dst.test", "127.0.0.33", cert="wrong-name")
    world.domain("dst.test", [(10, "mx.dst.test")])
    relay = world.relay()
    qid = world.submit(relay, ["bob@dst.test"])
    [msg] = mx.wait_for_messages_blocking(1, timeout=10)
    assert msg.tls_version is not None and msg.sni == "mx.dst.test"
    [ev] = relay.wait_event("delivered", queue_id=qid)
    assert ev["verified"] is False and ev["tls"] == msg.tls_version


def test_sigterm_exits_zero_and_queue_survives_restart(world: World) -> None:
    world.zone.set_rcode("broken.test", "SERVFAIL")
    data = world.config(delivery={"retry_intervals": ["1h"]})
    relay = world.relay(data)
    qid = world.submit(relay, ["bob@broken.test"])
    relay.wait_event("deferred", queue_id=qid)
    assert relay.stop() == 0
    second = world.relay(data, name="config.toml")
    [ev] = second.wait_event("started", count=2)[-1:]
    assert ev["queued"] == 1
    assert [m["id"] for m in queue(second)] == [qid]


def test_second_instance_refuses_same_spool(world: World) -> None:
    data = world.config()
    world.relay(data)
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "mta", "serve", "--config", str(world.tmp / "config.toml")],
                         capture_output=True, text=True, timeout=20)
    assert out.returncode == 1
    assert "in use by another mta" in out.stderr


def test_smtp_41_null_sender_relayed_as_null(world: World) -> None:
    mx = world.mx_host("mx.dst.test", "127.0.0.35")
    world.domain("dst.test", [(10, "mx.dst.test")])
    relay = world.relay()
    world.submit(relay, ["bob@dst.test"], sender="")
    [msg] = mx.wait_for_messages_blocking(1, timeout=10)
    assert msg.mail_from == "<>"


def test_smtp_38_failed_dsn_gets_no_dsn(world: World) -> None:
    """The sender's MX refuses the bounce: the DSN bounces too, and nothing more is generated (DSN-12)."""
    world.sender_mx.rcpt_replies = {"alice@src.test": USER_UNKNOWN}
    world.mx_host("mx.dst.test", "127.0.0.36", rcpt_replies={"gone@dst.test": USER_UNKNOWN})
    world.domain("dst.test", [(10, "mx.dst.test")])
    relay = world.relay()
    qid = world.submit(relay, ["gone@dst.test"])
    relay.wait_event("bounced", queue_id=qid)
    [dsn_bounce] = relay.wait_event("bounced", recipient="alice@src.test")
    time.sleep(1.0)
    assert len(relay.events("accepted")) == 2  # the message and its one DSN, no DSN of the DSN
    assert len(relay.events("bounced")) == 2
    assert dsn_bounce["status"] == "5.1.1"
    assert queue(relay) == []
