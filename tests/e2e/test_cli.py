"""Operator CLI against a running relay and offline: queue list/show/hold/release/delete, passwd, check-config."""

from __future__ import annotations

import json
from pathlib import Path

from tests.e2e.test_delivery import dsn_fields, queue
from tests.support.relay import run_cli, write_config
from tests.support.world import World


def test_queue_commands_on_a_running_server(world: World) -> None:
    world.zone.set_rcode("broken.test", "SERVFAIL")
    relay = world.relay(world.config(delivery={"retry_intervals": ["1h"]}))
    qid = world.submit(relay, ["bob@broken.test"], body=b"Subject: hello there\r\n\r\nbody\r\n")
    relay.wait_event("deferred", queue_id=qid)
    text = run_cli(relay.config, "queue", "list")
    assert qid in text.stdout and "bob@broken.test" in text.stdout and "deferred" in text.stdout
    show = run_cli(relay.config, "queue", "show", qid)
    assert show.returncode == 0 and "Subject: hello there" in show.stdout and '"status": "deferred"' in show.stdout
    assert run_cli(relay.config, "queue", "hold", qid).returncode == 0
    relay.wait_event("held", queue_id=qid, timeout=5)
    assert queue(relay)[0]["held"] is True
    assert run_cli(relay.config, "queue", "release", qid).returncode == 0
    relay.wait_event("deferred", count=2, queue_id=qid)  # released = retried now
    assert run_cli(relay.config, "queue", "delete", qid).returncode == 0
    relay.wait_event("deleted", queue_id=qid, timeout=5)
    assert queue(relay) == []
    missing = run_cli(relay.config, "queue", "hold", "NOSUCHID")
    assert missing.returncode == 1 and "no such message" in missing.stderr


def test_queue_commands_offline(world: World) -> None:
    world.zone.set_rcode("broken.test", "SERVFAIL")
    relay = world.relay(world.config(delivery={"retry_intervals": ["1h"]}))
    qid = world.submit(relay, ["bob@broken.test"])
    relay.wait_event("deferred", queue_id=qid)
    assert relay.stop() == 0
    out = run_cli(relay.config, "queue", "hold", qid)
    assert out.returncode == 0 and "1 message" in out.stdout
    assert queue(relay)[0]["held"] is True
    assert run_cli(relay.config, "queue", "delete", qid).returncode == 0
    assert queue(relay) == []
    assert run_cli(relay.config, "queue", "list").stdout.strip() == "Mail queue is empty"


def test_passwd_reads_stdin_and_check_config(tmp_path: Path) -> None:
    users = tmp_path / "users"
    out = run_cli(None, "passwd", "--users-file", str(users), "alice", stdin="s3cret\n")
    assert out.returncode == 0, out.stderr
    line = users.read_text()
    assert line.startswith("alice:scrypt$") and "s3cret" not in line
    cfg = write_config(tmp_path, {"submission": {"users_file": str(users)}})
    assert run_cli(cfg, "check-config").returncode == 0
    bad = tmp_path / "bad.toml"
    bad.write_text('[delivery]\nretry_intervals = ["5m", "1h", "5x"]\n')
    out = run_cli(bad, "check-config")
    assert out.returncode == 1
    assert out.stderr.strip() == f'mta: {bad}: delivery.retry_intervals[2]: "5x" is not a duration'


def test_dsn_13_delay_warning_sent_once(world: World) -> None:
    world.mx_host("mx.dst.test", "127.0.0.37", replies={"RCPT": "451 4.3.0 try later"})
    world.domain("dst.test", [(10, "mx.dst.test")])
    relay = world.relay(world.config(delivery={"retry_intervals": ["1s"], "delay_warning": "1s"}))
    qid = world.submit(relay, ["bob@dst.test"])
    relay.wait_event("deferred", count=3, queue_id=qid, timeout=20)
    [dsn] = world.sender_mx.wait_for_messages_blocking(1, timeout=10)
    _top, blocks = dsn_fields(dsn.data)
    assert blocks[1]["Action"] == "delayed" and blocks[1]["Status"].startswith("4.")
    assert "Will-Retry-Until" in blocks[1]
    assert len(world.sender_mx.messages) == 1
    [m] = json.loads(run_cli(relay.config, "queue", "list", "--json").stdout)
    assert m["recipients"][0]["status"] == "deferred"


def test_smart_host_auth_and_verified_tls(world: World) -> None:
    hub = world.mx_host("smarthost.test", "127.0.0.38", credentials={"relayuser": "pw123"})
    secret = world.tmp / "relay-secret"
    secret.write_text("pw123\n")
    relay = world.relay(world.config(mta_sts={"enabled": False}, delivery={
        "relayhost": f"smarthost.test:{world.smtp_port}", "relayhost_tls": "verify",
        "relayhost_username": "relayuser", "relayhost_password_file": str(secret)}))
    qid = world.submit(relay, ["bob@anywhere.test"])
    [msg] = hub.wait_for_messages_blocking(1, timeout=10)
    assert msg.tls_version is not None
    assert hub.sessions[0].auth_user == "relayuser"
    assert relay.wait_event("delivered", queue_id=qid)[0]["verified"] is True
    assert "pw123" not in relay.log_text()
