"""The connection pool under concurrency, with real sessions to a fake MX on loopback.

Found by the crash soak (bench/crash_soak.py, issue 17): while `sweep()` waited on one stale
session's QUIT, a worker took a fresh session out of the pool, and the sweep then wrote its
stale copy of the idle list back, so the session in use was idle again and a second worker
interleaved its transaction on the same connection ("503 nested MAIL command" was bounced as
permanent, "invalid reply to DATA: 250 2.1.5" deferred).
"""

from __future__ import annotations

import asyncio

from mta.delivery.pool import ConnectionPool
from mta.delivery.smtp_client import SmtpSession, Timeouts, TlsMode
from tests.support.fake_mx import FakeMx

FAST = Timeouts(connect=2, greeting=2, ehlo=2, mail=2, rcpt=2, data_init=2, data_block=2, data_final=2)
KEY = ("mx.test", "127.0.0.42", 0, TlsMode.MAY)


async def _session(mx: FakeMx) -> SmtpSession:
    return await SmtpSession.open(address="127.0.0.42", port=mx.port, mx_host="mx.test", helo_name="relay.test",
                                  tls_mode=TlsMode.MAY, ca_file=None, timeouts=FAST)


async def test_dlv_2_sweep_never_returns_a_session_in_use_to_the_pool() -> None:
    mx = await FakeMx("127.0.0.42").start()
    now = [1000.0]
    pool = ConnectionPool(max_idle_time=10.0, clock=lambda: now[0])
    try:
        stale, fresh, late = await _session(mx), await _session(mx), await _session(mx)
        stale.last_used, fresh.last_used = 0.0, 995.0
        await pool.put(KEY, fresh)
        await pool.put(KEY, stale)
        sweep = asyncio.ensure_future(pool.sweep())
        await asyncio.sleep(0)  # the sweep kept `fresh` and now waits for the stale session's QUIT
        taken = await pool.get(KEY)  # a worker takes the fresh one meanwhile ...
        late.last_used = now[0]
        await pool.put(KEY, late)  # ... and another returns a session
        await sweep
        assert taken is fresh
        again = await pool.get(KEY)
        assert again is late, "the session in use went back to the pool (or a returned one was dropped)"
        assert await pool.get(KEY) is None
        for s in (fresh, late):
            await pool.discard(s)
    finally:
        await mx.stop()
