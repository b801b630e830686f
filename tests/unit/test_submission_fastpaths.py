"""The submission listener's shortcuts around aiosmtpd's per-connection and per-command costs
(issue 18, CPU per message) give exactly aiosmtpd's own results.

- `RelaySMTP._getaddr` (MAIL/RCPT argument) equals aiosmtpd's `SMTP._getaddr` on any input,
  including the plain `<local@domain> PARAMS` form it takes apart without the email parser.
- The trimmed `dir()` of the protocol and the handler still gives aiosmtpd every smtp_*, auth_*
  and handle_* name it would have found with the full listing.
"""

from __future__ import annotations

import asyncio
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
from mta.submission.listener import Listeners, RelaySMTP

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
    proto = Listeners(cfg.submission, cfg.hostname, handler).protocol()
    assert isinstance(proto, RelaySMTP)
    full_proto, full_handler = object.__dir__(proto), object.__dir__(handler)
    assert set(proto._smtp_methods) == {n[5:] for n in full_proto if n.startswith("smtp_")}
    assert set(proto._handle_hooks) == {n[7:] for n in full_handler if n.startswith("handle_")}
    assert {"EHLO", "MAIL", "RCPT", "DATA"} <= set(proto._handle_hooks)
    expected_auth = {n for n in [*full_proto, *full_handler] if n.startswith("auth_")}
    assert {m.method.__name__ for m in proto._auth_methods.values()} == expected_auth
    assert proto._ehlo_hook_ver == "new"
    assert len(inspect.signature(handler.handle_EHLO).parameters) == 5
    await asyncio.sleep(0)


async def test_hook_set_on_the_handler_instance_is_still_found(tmp_path: Path) -> None:
    cfg = config.from_dict({"hostname": "relay.test", "queue": {"path": str(tmp_path / "q")},
                            "submission": {"listen": ["127.0.0.1:0"]}})
    handler = SubmissionHandler(cfg.submission, cfg.hostname, SpoolStore(cfg.queue.path), lambda meta: None)

    async def handle_RSET(*args: Any) -> str:
        return "250 2.0.0 Ok"

    handler.handle_RSET = handle_RSET  # type: ignore[attr-defined]
    proto = Listeners(cfg.submission, cfg.hostname, handler).protocol()
    assert proto._handle_hooks["RSET"] is handle_RSET
