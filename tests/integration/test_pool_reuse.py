"""Reused delivery connections without a per-message RSET (issue 18, CPU per message), and the
pooled connection the server closes (pool rule in mta.delivery.pool).

Real parts: fake DNS, an aiosmtpd MX on loopback, `deliver_domain` with a real ConnectionPool.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from mta.delivery.attempt import AttemptContext, deliver_domain
from mta.delivery.pool import ConnectionPool
from mta.delivery.smtp_client import SmtpSession, Timeouts, TlsMode
from mta.net.dns import Resolver
from tests.support.fake_dns import FakeDns
from tests.support.fake_mx import FakeMx

DOMAIN = "reuse.test"
MX_HOST = "mx.reuse.test"
MX_IP = "127.0.0.43"
MSG = b"Subject: x\r\n\r\nhi\r\n"
FAST = Timeouts(connect=2, greeting=2, ehlo=2, mail=2, rcpt=2, data_init=2, data_block=2, data_final=2)


class _Once(str):
    """A FakeMx `drop_after` verb that applies to the first command of that verb only."""

    fired = False

    def __eq__(self, other: object) -> bool:
        if not self.fired and str.__eq__(self, other):
            self.fired = True
            return True
        return False

    __hash__ = str.__hash__


@dataclass
class Rig:
    mx: FakeMx
    ctx: AttemptContext

    async def send(self, rcpt: str) -> str:
        [outcome] = (await deliver_domain(self.ctx, DOMAIN, [rcpt], "a@src.test", MSG)).values()
        return outcome.kind


@pytest.fixture(params=[False, True], ids=["one-by-one", "pipelined"])
async def rig(request: pytest.FixtureRequest) -> AsyncIterator[Rig]:
    """Each test twice: with a server that does not offer PIPELINING and with one that does (PERF-6)."""
    with FakeDns() as dns_server:
        async with FakeMx(MX_IP, hostname=MX_HOST, pipelining=request.param) as mx:
            dns_server.zone.add(DOMAIN, "MX", f"10 {MX_HOST}.")
            dns_server.zone.add(MX_HOST, "A", MX_IP)
            resolver = Resolver([dns_server.host], port=dns_server.port, timeout=2.0)
            pool = ConnectionPool(30.0)
            ctx = AttemptContext(hostname="relay.test", resolver=resolver, pool=pool, timeouts=FAST, smtp_port=mx.port)
            try:
                yield Rig(mx, ctx)
            finally:
                await pool.close_all()


async def test_dlv_reuse_sends_next_mail_without_rset(rig: Rig) -> None:
    assert [await rig.send(f"u{i}@{DOMAIN}") for i in range(3)] == ["delivered"] * 3
    [session] = rig.mx.sessions
    assert session.verbs.count("MAIL") == 3 and not session.saw("RSET")
    assert rig.ctx.pool.reused == 2


async def test_dlv_connection_closed_while_pooled_is_not_used(rig: Rig) -> None:
    assert await rig.send(f"a@{DOMAIN}") == "delivered"
    for live in list(rig.mx._live):
        live.drop()  # the server ends the idle connection (its own idle timeout)
    await asyncio.sleep(0.2)
    assert await rig.send(f"b@{DOMAIN}") == "delivered"
    assert len(rig.mx.sessions) == 2 and [m.rcpt_tos for m in rig.mx.messages] == [[f"a@{DOMAIN}"], [f"b@{DOMAIN}"]]


async def test_dlv_connection_closed_at_mail_on_reuse_goes_out_on_a_new_one(rig: Rig) -> None:
    """The server closes the pooled connection just as MAIL arrives: nothing of the message was sent,
    so it is delivered on a new connection in the same attempt, not deferred."""
    assert await rig.send(f"a@{DOMAIN}") == "delivered"
    rig.mx.drop_after = _Once("MAIL")
    assert await rig.send(f"b@{DOMAIN}") == "delivered"
    first, second = rig.mx.sessions
    assert first.verbs.count("MAIL") == 2 and second.verbs.count("MAIL") == 1
    assert [m.rcpt_tos for m in rig.mx.messages] == [[f"a@{DOMAIN}"], [f"b@{DOMAIN}"]]


async def test_dlv_mail_dropped_on_a_new_connection_is_not_retried(rig: Rig) -> None:
    """Only a pooled connection gets the second chance: a new one that fails at MAIL defers."""
    rig.mx.drop_after = "MAIL"
    assert await rig.send(f"a@{DOMAIN}") == "transient"
    assert len(rig.mx.sessions) == 1


@pytest.mark.parametrize(("override", "idle"), [
    (None, True),  # 250 to the end of data
    ("DATA_END", True),  # refused at the end of data: the transaction is over all the same
    ("DATA", False),  # DATA itself refused: the server may still hold MAIL/RCPT, so RSET first
])
async def test_dlv_rset_only_when_a_transaction_may_be_open(override: str | None, idle: bool) -> None:
    replies = {override: "554 5.6.0 no"} if override else {}
    async with FakeMx(MX_IP, hostname=MX_HOST, replies=replies) as mx:
        pool = ConnectionPool(30.0)
        session = await SmtpSession.open(address=MX_IP, port=mx.port, mx_host=MX_HOST, helo_name="relay.test",
                                         tls_mode=TlsMode.MAY, ca_file=None, timeouts=FAST)
        await session.send("a@src.test", [f"b@{DOMAIN}"], MSG)
        assert session.idle is idle
        key = (MX_HOST, MX_IP, mx.port, (TlsMode.MAY, None))
        await pool.put(key, session)
        assert await pool.get(key) is session
        await session.close()
        [rec] = await mx.wait_for_sessions(1, closed=True)
        assert rec.saw("RSET") is not idle
