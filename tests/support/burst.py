"""A burst of SMTP clients sending until a deadline, for tests that kill the relay under load."""

from __future__ import annotations

import asyncio
import re
import time

import aiosmtplib


async def burst(host: str, port: int, acked: list[str], stop_at: float, *, message: bytes, clients: int = 10,
                sender: str = "s@src.test") -> None:
    """`clients` connections send `message` back to back until `stop_at` (monotonic); every queue id
    answered with a 250 goes into `acked`. A refused or dropped connection is retried after 20 ms:
    the relay under test is being killed or stopped."""

    async def client(n: int) -> None:
        while time.monotonic() < stop_at:
            try:
                async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=5) as c:
                    while time.monotonic() < stop_at:
                        _errors, reply = await c.sendmail(sender, [f"r{n}@dst.test"], message)
                        m = re.search(r"queued as (\w+)", reply)
                        assert m, reply
                        acked.append(m.group(1))
            except (aiosmtplib.SMTPException, OSError):
                await asyncio.sleep(0.02)

    await asyncio.gather(*(client(i) for i in range(clients)))
