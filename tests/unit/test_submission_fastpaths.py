"""The submission listener's shortcuts around aiosmtpd's per-connection and per-command costs
(issue 18, CPU per message) give exactly aiosmtpd's own results.

- `RelaySMTP._getaddr` (MAIL/RCPT argument) equals aiosmtpd's `SMTP._getaddr` on any input,
  including the plain `<local@domain> PARAMS` form it takes apart without the email parser.
- DATA read in blocks ending at `.` CRLF (`RelaySMTP._read_data`) gives what reading it a line at a
  time gives (the rule of RFC 5321 §4.1.1.4 / §4.5.2, SMTP-26/27) for any data, any size limit and
  any way the bytes are cut into TCP segments, and leaves what follows the terminator unread.
- The trimmed `dir()` of the protocol and the handler still gives aiosmtpd every smtp_*, auth_*
  and handle_* name it would have found with the full listing, and the protocols after the first
  one of a listener get the same names bound to themselves without aiosmtpd's introspection.
"""

from __future__ import annotations

import asyncio
import email.utils
import inspect
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from aiosmtpd.smtp import SMTP
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mta import config
from mta.spool.store import SpoolStore
from mta.submission.handler import SubmissionHandler
from mta.submission.headers import rfc5322_date
from mta.submission.listener import DATA_LINE_LIMIT, READ_LIMIT, Listeners, RelaySMTP

_PIECES = st.sampled_from(["<", ">", "@", ".", " ", "\t", "a", "Z", "0", "-", "+", "=", "\"", "\\", "(", ")",
                           "[", "]", ",", ":", ";", "é", "SIZE=10", "BODY=8BITMIME", "user", "example.org"])


@settings(max_examples=1500, deadline=None)
@given(st.lists(_PIECES, max_size=14).map("".join), st.sampled_from([0, 3, 64]))
@example("<user@example.org>", 0)
@example("<user@example.org> SIZE=2048 BODY=8BITMIME", 0)
@example("  <a.b@c.d>\t", 0)
@example("<a..b@c>", 0)
@example("<.a@c>", 0)
@example("<a@[127.0.0.1]>", 0)
@example("<\"a b\"@c>", 0)
@example("<longlocal@c>", 3)
@example("<a@b>x", 0)
@example("a@b SIZE=1", 0)
@example("<>", 0)
def test_getaddr_same_as_aiosmtpd(arg: str, limit: int) -> None:
    self = SimpleNamespace(local_part_limit=limit)
    assert _outcome(RelaySMTP._getaddr, self, arg) == _outcome(SMTP._getaddr, self, arg)


def _outcome(parse: Any, self: Any, arg: str) -> object:
    """The result, or the exception type (the email parser raises IndexError on "<" alone)."""
    try:
        return parse(self, arg)
    except Exception as exc:
        return type(exc)


async def test_hook_discovery_unchanged_by_short_dir(tmp_path: Path) -> None:
    cfg = config.from_dict({"hostname": "relay.test", "queue": {"path": str(tmp_path / "q")},
                            "submission": {"listen": ["127.0.0.1:0"]}})
    handler = SubmissionHandler(cfg.submission, cfg.hostname, SpoolStore(cfg.queue.path), lambda meta: None)
    listeners = Listeners(cfg.submission, cfg.hostname, handler)
    # The first connection's protocol runs aiosmtpd's discovery; the next ones bind what it found.
    first, second = listeners.protocol(), listeners.protocol()
    for proto in (first, second):
        assert isinstance(proto, RelaySMTP)
        full_proto, full_handler = object.__dir__(proto), object.__dir__(handler)
        assert set(proto._smtp_methods) == {n[5:] for n in full_proto if n.startswith("smtp_")}
        assert all(m.__self__ is proto for m in proto._smtp_methods.values())  # bound to this connection
        assert set(proto._handle_hooks) == {n[7:] for n in full_handler if n.startswith("handle_")}
        assert {"EHLO", "MAIL", "RCPT", "DATA"} <= set(proto._handle_hooks)
        expected_auth = {n for n in [*full_proto, *full_handler] if n.startswith("auth_")}
        assert {m.method.__name__ for m in proto._auth_methods.values()} == expected_auth
        assert all(m.method.__self__ is (proto if m.is_builtin else handler) for m in proto._auth_methods.values())
        assert proto._ehlo_hook_ver == "new"
    assert first._auth_methods.keys() == second._auth_methods.keys()
    assert {k: m.__func__ for k, m in first._smtp_methods.items()} == {
        k: m.__func__ for k, m in second._smtp_methods.items()}
    assert dir(second) and dir(handler)  # the short listing is back after construction
    assert len(inspect.signature(handler.handle_EHLO).parameters) == 5
    await asyncio.sleep(0)


async def test_hook_set_on_the_handler_instance_is_still_found(tmp_path: Path) -> None:
    cfg = config.from_dict({"hostname": "relay.test", "queue": {"path": str(tmp_path / "q")},
                            "submission": {"listen": ["127.0.0.1:0"]}})
    handler = SubmissionHandler(cfg.submission, cfg.hostname, SpoolStore(cfg.queue.path), lambda meta: None)

    async def handle_RSET(*args: Any) -> str:
        return "250 2.0.0 Ok"

    listeners = Listeners(cfg.submission, cfg.hostname, handler)
    assert "RSET" not in listeners.protocol()._handle_hooks
    handler.handle_RSET = handle_RSET  # type: ignore[attr-defined]
    proto = listeners.protocol()
    assert proto._handle_hooks["RSET"] is handle_RSET


def _by_lines(stream: bytes, limit: int) -> tuple[bytes, int, bool, bytes]:
    """The reference: one CRLF-ended line at a time; (content, size, too long, what is left)."""
    kept, size, too_long, pos = [], 0, False, 0
    while True:
        end = stream.find(b"\r\n", pos)
        line = stream[pos:end + 2]
        pos = end + 2
        if line == b".\r\n":
            break
        size += len(line)
        too_long = too_long or len(line) > DATA_LINE_LIMIT
        kept.append(line[1:] if line.startswith(b".") else line)
    if limit and size > limit:
        return b"", size, False, stream[pos:]
    if too_long:
        return b"", size, True, stream[pos:]
    return b"".join(kept), size, False, stream[pos:]


_DATA_PIECES = st.sampled_from([b"\r\n", b".", b"..", b"\r", b"\n", b"a", b"Subject: x", b"\r\n.\r", b".\r\n",
                                b"x" * 200, b"y" * 1100, b"\r\n..\r\n", b"\xff"])


@settings(max_examples=1500, deadline=None)
@given(st.lists(_DATA_PIECES, max_size=30).map(b"".join), st.sampled_from([0, 50, 3000]),
       st.lists(st.integers(1, 40), max_size=8), st.sampled_from([b"", b"QUIT\r\n", b".\r\nMAIL"]))
@example(b"", 0, [], b"QUIT\r\n")
@example(b".", 0, [1, 1], b"")
@example(b"..\r\n.a\r\nb.\r\n", 0, [], b"")
@example(b"x" * (READ_LIMIT * 2 + 5) + b"\r\n", 0, [], b"")
@example(b"x" * 999 + b"\r\n" + b"y" * 1000 + b"\r\n", 0, [], b"")
def test_data_read_in_blocks_equals_reading_it_a_line_at_a_time(data: bytes, limit: int, cuts: list[int],
                                                                after: bytes) -> None:
    # The message as a client sends it: its lines, then the terminator at a line start.
    stream = data + (b"" if not data or data.endswith(b"\r\n") else b"\r\n") + b".\r\n" + after

    async def run() -> tuple[bytes, int, bool, bytes]:
        reader = asyncio.StreamReader(limit=READ_LIMIT)
        self = SimpleNamespace(_reader=reader)
        task = asyncio.ensure_future(RelaySMTP._read_data(self, limit))  # type: ignore[arg-type]
        pos = 0
        for cut in [*cuts, len(stream)]:  # the bytes arrive in these segments
            reader.feed_data(stream[pos:pos + cut])
            pos += cut
            await asyncio.sleep(0)
        reader.feed_data(stream[pos:])
        reader.feed_eof()
        content, size, too_long = await asyncio.wait_for(task, 5)
        return content, size, too_long, await reader.read()

    assert asyncio.run(run()) == _by_lines(stream, limit)


@settings(max_examples=500, deadline=None)
@given(st.floats(min_value=0, max_value=4_102_444_800, allow_nan=False))
@example(1_764_720_000.999999)
@example(0.0)
def test_date_made_once_per_second_equals_formatdate(now: float) -> None:
    assert rfc5322_date(now) == email.utils.formatdate(now)
