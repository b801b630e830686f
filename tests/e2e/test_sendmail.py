"""The real `sendmail` command as applications call it (PHP, cron, scripts, `-bs` in a pipe), beside a
real `mta serve`, and DKIM end to end: mail submitted over SMTP and through sendmail reaches a
loopback MX with signatures dkimpy verifies against the keys in the fake DNS."""

from __future__ import annotations

import email
import email.policy
import json
import os
import pwd
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.dkim import make_key, verify_all
from tests.support.relay import run_cli, write_config
from tests.support.world import World

LOGIN = pwd.getpwuid(os.getuid()).pw_name
PHP_MAIL = (b"To: bob@dst.test\nSubject: Your order\nX-PHP-Originating-Script: 1000:shop.php\n\n"
            b"Thanks!\n.\nStill the body.\n")
CRON_MAIL = (b"From: root (Cron Daemon)\nTo: ops@dst.test\nSubject: Cron <root@box> /usr/local/bin/backup\n"
             b"Content-Type: text/plain; charset=UTF-8\n\nbackup done\n")


def sendmail(config: Path, *args: str, stdin: bytes = b"", bare: bool = True) -> subprocess.CompletedProcess[bytes]:
    """The bare `sendmail` script (config from MTA_CONFIG) or `mta sendmail --config F`."""
    if bare:
        cmd = [sys.executable, "-m", "mta.sendmail", *args]
        env = dict(os.environ, MTA_CONFIG=str(config))
    else:
        cmd = [sys.executable, "-m", "mta", "sendmail", "--config", str(config), *args]
        env = dict(os.environ)
    return subprocess.run(cmd, input=stdin, capture_output=True, env=env, timeout=20)


@pytest.fixture
def dst(world: World) -> Any:
    mx = world.mx_host("mx1.dst.test", "127.0.0.21")
    world.domain("dst.test", [(10, "mx1.dst.test")])
    return mx


def test_sendmail_1_2_3_5_php_t_i_while_serve_runs_is_delivered_at_once(world: World, dst: Any) -> None:
    """SENDMAIL-1/5: PHP's `sendmail -t -i`: recipients from To:, a lone "." is text, From: added from
    the login name; a running server delivers it without waiting for a retry or a restart."""
    relay = world.relay()
    out = sendmail(relay.config, "-t", "-i", stdin=PHP_MAIL)
    assert out.returncode == 0 and out.stdout == b"" and out.stderr == b"", out
    stored = time.monotonic()
    (m,) = dst.wait_for_messages_blocking(1, timeout=20)
    assert time.monotonic() - stored < 3  # ctl poll 0.25 s; without the notice it would wait for a restart
    assert m.mail_from == f"{LOGIN}@relay.test" and m.rcpt_tos == ["bob@dst.test"]
    msg = email.message_from_bytes(m.data, policy=email.policy.default)
    assert msg["From"] == f"{LOGIN}@relay.test" and msg["Message-ID"] and msg["Date"]
    assert msg["Received"].startswith(f"by relay.test (mta sendmail, from userid {os.getuid()});")
    assert m.data.endswith(b"\r\n\r\nThanks!\r\n.\r\nStill the body.\r\n")  # -i: the lone dot is text
    assert b"\r\n" in m.data and b"\n" not in m.data.replace(b"\r\n", b"")


def test_sendmail_1_2_3_cron_flags_keep_from_and_take_bcc_out(world: World, dst: Any) -> None:
    """SENDMAIL-1/2/3: cron's `-FCronDaemon -i -odi -oem -oi -t` (plus a bare `root`, qualified with our
    hostname); Bcc recipients get the mail but not the field; the message's own From: is kept."""
    relay = world.relay()
    mail = CRON_MAIL.replace(b"To: ops@dst.test\n", b"To: ops@dst.test\nBcc: audit@dst.test\n")
    world.domain("relay.test", [(10, "mx1.dst.test")])  # where a bare `root` goes: root@<hostname>
    out = sendmail(relay.config, "-FCronDaemon", "-i", "-odi", "-oem", "-oi", "-t", "root", stdin=mail)
    assert out.returncode == 0, out.stderr
    got = dst.wait_for_messages_blocking(2, timeout=20)  # one transaction per recipient domain
    assert sorted(r for m in got for r in m.rcpt_tos) == ["audit@dst.test", "ops@dst.test", "root@relay.test"]
    for m in got:
        assert b"audit" not in m.data and b"(Cron Daemon)" in m.data
        assert m.data.count(b"\r\nFrom: ") + m.data.startswith(b"From: ") == 1


def test_sendmail_3_4_5_stores_while_serve_is_down_and_serve_delivers_at_start(world: World, dst: Any) -> None:
    """SENDMAIL-5: no server running: the message waits in the spool (`-bp` lists it), the next start sends it."""
    config = write_config(world.tmp, world.config())
    no_t = b"From: App <app@src.test>\nSubject: report\n\nnumbers\n.\nignored after the dot\n"
    out = sendmail(config, "-f", "app@src.test", "-F", "Not Used", "carol@dst.test", stdin=no_t, bare=False)
    assert out.returncode == 0, out.stderr
    listing = json.loads(run_cli(config, "queue", "list", "--json").stdout)
    assert [(q["sender"], [r["address"] for r in q["recipients"]]) for q in listing] == [
        ("app@src.test", ["carol@dst.test"])]
    assert b"carol@dst.test" in sendmail(config, "-bp").stdout
    relay = world.relay(world.config())
    (m,) = dst.wait_for_messages_blocking(1, timeout=20)
    assert relay.wait_event("delivered") and m.mail_from == "app@src.test"
    assert m.data.endswith(b"\r\n\r\nnumbers\r\n")  # without -i the lone dot ended the input
    assert b"From: App <app@src.test>" in m.data and b"Not Used" not in m.data


def test_sendmail_1_bs_runs_smtp_on_a_pipe(world: World, dst: Any) -> None:
    """SENDMAIL-1: `-bs`: SMTP on stdin/stdout (pipelined, as scripts write it), accepted like the listener."""
    relay = world.relay()
    dialogue = (b"EHLO app.local\r\nMAIL FROM:<app@src.test>\r\nRCPT TO:<dave@dst.test>\r\nDATA\r\n"
                b"From: app@src.test\r\nSubject: via -bs\r\n\r\n..leading dot\r\n.\r\nQUIT\r\n")
    out = sendmail(relay.config, "-bs", stdin=dialogue)
    assert out.returncode == 0, out.stderr
    replies = out.stdout.decode().splitlines()
    assert replies[0].startswith("220 relay.test") and replies[-1].startswith("221")
    assert any(r.startswith("250 2.0.0 Ok: queued as ") for r in replies)
    assert not any(r.startswith(("5", "4")) for r in replies) and "STARTTLS" not in out.stdout.decode()
    (m,) = dst.wait_for_messages_blocking(1, timeout=20)
    assert m.rcpt_tos == ["dave@dst.test"] and m.data.endswith(b"\r\n\r\n.leading dot\r\n")


@pytest.mark.parametrize(("args", "stdin", "code", "error"), [
    (["-q1h"], b"", 64, "-q: unknown option"),
    (["-i"], b"Subject: x\n\nno recipient\n", 64, "no recipients"),
    (["-t"], b"To: Bob <bob@bad..domain>\n\nx\n", 67, "recipient 'bob@bad..domain' is not a valid address"),
    (["-f", "bad sender", "u@dst.test"], b"x\n", 67, "sender 'bad sender' is not a valid address"),
    (["u@dst.test"], b"Subject: x\n\n" + b"y" * 5000 + b"\n", 65, "message too big"),
])
def test_sendmail_6_exit_codes(tmp_path: Path, world: World, args: list[str], stdin: bytes, code: int,
                               error: str) -> None:
    config = write_config(tmp_path, world.config(submission={"max_message_size": "4KB"}))
    out = sendmail(config, *args, stdin=stdin)
    assert out.returncode == code and error in out.stderr.decode(), out
    assert run_cli(config, "queue", "list", "--json").stdout.strip() in ("[]", "")  # nothing half-stored


def test_sendmail_6_unusable_spool_and_config(tmp_path: Path, world: World) -> None:
    blocked = tmp_path / "file-in-the-way"
    blocked.write_text("")
    config = write_config(tmp_path, world.config(queue={"path": str(blocked)}))
    out = sendmail(config, "u@dst.test", stdin=b"Subject: x\n\nbody\n")
    assert out.returncode == 73 and "not a directory" in out.stderr.decode()  # EX_CANTCREAT, never a silent loss
    missing = sendmail(tmp_path / "nope.toml", "u@dst.test", stdin=b"x\n")
    assert missing.returncode == 78 and "cannot read" in missing.stderr.decode()  # EX_CONFIG


def test_dkim_1_4_5_7_smtp_and_sendmail_mail_arrive_signed_and_verified(world: World, dst: Any) -> None:
    """Issue 12's done criterion: one message over SMTP, one via `sendmail -t -i`, both reach the MX with
    an RSA and an Ed25519 signature (dual, DKIM-4) that dkimpy verifies against the published keys."""
    rsa = make_key(world.tmp / "keys", "src.test", "mta2026")
    ed = make_key(world.tmp / "keys", "src.test", "ed2026", "ed25519-sha256")
    rsa.publish(world.zone)
    ed.publish(world.zone)
    relay = world.relay(world.config(dkim={"enabled": True, "keys": [rsa.config(), ed.config()]}))
    world.submit(relay, ["erin@dst.test"], body=b"From: Alice <alice@src.test>\r\nTo: erin@dst.test\r\n"
                                              b"Subject: over SMTP\r\n\r\nGr\xc3\xbc\xc3\x9fe\r\n")
    php = b"From: shop@mail.src.test\nTo: frank@dst.test\nSubject: via sendmail\n\nbody\n"
    assert sendmail(relay.config, "-t", "-i", stdin=php).returncode == 0
    unsigned = b"From: someone@elsewhere.test\nTo: gina@dst.test\nSubject: no key\n\nbody\n"
    assert sendmail(relay.config, "-t", "-i", stdin=unsigned).returncode == 0
    got = {m.rcpt_tos[0]: m for m in dst.wait_for_messages_blocking(3, timeout=15)}
    for rcpt in ("erin@dst.test", "frank@dst.test"):
        data = got[rcpt].data
        assert data.startswith(b"DKIM-Signature: v=1; a=rsa-sha256;")  # signature first
        assert verify_all(data, world.dns) == [True, True], rcpt
        assert b" d=src.test;" in data
    assert b"DKIM-Signature" not in got["gina@dst.test"].data
    accepted = relay.wait_event("accepted", count=1)
    assert accepted[0]["dkim"] == "src.test/mta2026 src.test/ed2026"


def test_sendmail_1_bs_input_ending_mid_data_accepts_nothing(world: World) -> None:
    """SENDMAIL-1: a pipe closed before the final "." is no message: 421 at the end, nothing stored."""
    config = write_config(world.tmp, world.config())
    dialogue = b"HELO app\r\nMAIL FROM:<a@src.test>\r\nRCPT TO:<b@dst.test>\r\nDATA\r\nSubject: cut\r\n\r\nhalf"
    out = sendmail(config, "-bs", stdin=dialogue)
    assert out.returncode == 0, out.stderr
    assert out.stdout.decode().splitlines()[-1] == "421 4.4.2 end of input, closing"
    assert json.loads(run_cli(config, "queue", "list", "--json").stdout) == []
