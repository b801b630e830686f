"""sendmail's flag parser and input preparation (pure): what PHP, cron and scripts send."""

from __future__ import annotations

import pytest

from mta.sendmail import message
from mta.sendmail.args import Options, UsageError, parse


@pytest.mark.parametrize(("argv", "expected"), [
    (["-t", "-i"], Options(extract=True, ignore_dots=True)),  # PHP's default sendmail_path
    (["-FCronDaemon", "-i", "-odi", "-oem", "-oi", "-t"],  # cron (Debian/Vixie)
     Options(extract=True, ignore_dots=True, full_name="CronDaemon")),
    (["-ti"], Options(extract=True, ignore_dots=True)),  # bundled
    (["-f", "app@example.org", "u@x.test"], Options(sender="app@example.org", recipients=("u@x.test",))),
    (["-fapp@example.org", "-F", "The App", "u@x.test"],
     Options(sender="app@example.org", full_name="The App", recipients=("u@x.test",))),
    (["-r", "<>", "u@x.test"], Options(sender="", recipients=("u@x.test",))),
    (["-f<a@b.test>", "u@x.test"], Options(sender="a@b.test", recipients=("u@x.test",))),
    (["-bs"], Options(mode="smtp")),
    (["-bp"], Options(mode="queue")),
    (["-bm", "-v", "-m", "-B8BITMIME", "-N", "never", "-oQ/tmp", "u@x.test"],
     Options(verbose=True, recipients=("u@x.test",))),
    (["-B", "7BIT", "-Nsuccess,delay", "--", "-odd@x.test"], Options(recipients=("-odd@x.test",))),
    (["u@x.test", "-t"], Options(recipients=("u@x.test", "-t"))),  # POSIX: options end at the first operand
    ([], Options()),
])
def test_sendmail_1_flags_real_callers_send(argv: list[str], expected: Options) -> None:
    assert parse(argv) == expected


@pytest.mark.parametrize(("argv", "error"), [
    (["-x"], "-x: unknown option"),
    (["-bd"], "-bd: unsupported mode"),
    (["-b"], "-b: unsupported mode"),
    (["-f"], "-f needs a value"),
    (["-t", "-q1h"], "-q: unknown option"),
])
def test_sendmail_1_anything_else_is_a_usage_error(argv: list[str], error: str) -> None:
    with pytest.raises(UsageError, match=error):
        parse(argv)


def prep(raw: bytes, **kw: object) -> tuple[bytes, list[str]]:
    args: dict[str, object] = {"ignore_dots": True, "extract": False, "sender": "me@relay.test", "full_name": None,
                               "recipients": ()}
    args.update(kw)
    return message.prepare(raw, **args)  # type: ignore[arg-type]


def test_sendmail_2_t_takes_to_cc_bcc_adds_to_argv_and_removes_bcc() -> None:
    raw = (b"To: A <a@x.test>, b@x.test\nCc: c@x.test\nBcc: hidden@x.test,\n  hidden2@x.test\n"
           b"Subject: s\n\nbody\n")
    data, rcpts = prep(raw, extract=True, recipients=("argv@x.test", "a@x.test"))
    assert rcpts == ["argv@x.test", "a@x.test", "b@x.test", "c@x.test", "hidden@x.test", "hidden2@x.test"]
    assert b"Bcc" not in data and b"hidden" not in data
    assert data == (b"From: me@relay.test\r\nTo: A <a@x.test>, b@x.test\r\nCc: c@x.test\r\nSubject: s\r\n"
                    b"\r\nbody\r\n")


def test_sendmail_3_from_added_with_full_name_only_when_missing() -> None:
    data, _ = prep(b"Subject: s\n\nbody\n", full_name="Cron Daemon")
    assert data.startswith(b"From: Cron Daemon <me@relay.test>\r\nSubject: s\r\n\r\n")
    data, _ = prep(b"From: app@example.org\nSubject: s\n\nbody\n", full_name="Cron Daemon")
    assert data.startswith(b"From: app@example.org\r\nSubject: s\r\n")
    data, _ = prep(b"Subject: s\n\n", full_name="Jörg")
    assert data.startswith(b"From: =?utf-8?b?SsO2cmc=?= <me@relay.test>\r\n")


def test_sendmail_4_lone_dot_ends_input_unless_i() -> None:
    raw = b"Subject: s\n\nline\n.\nafter\n"
    assert prep(raw, ignore_dots=False)[0].endswith(b"\r\n\r\nline\r\n")
    assert prep(raw, ignore_dots=True)[0].endswith(b"line\r\n.\r\nafter\r\n")
    assert prep(b"Subject: s\n\n..\n.", ignore_dots=False)[0].endswith(b"\r\n\r\n..\r\n")


def test_body_without_headers_stays_a_body() -> None:
    data, _ = prep(b"just text\nmore\n")
    assert data == b"From: me@relay.test\r\n\r\njust text\r\nmore\r\n"
    assert prep(b"")[0] == b"From: me@relay.test\r\n\r\n"
