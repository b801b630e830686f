"""Readiness probes (GET /readyz): each returns None when fine, else one line saying what is wrong.

Rule: ready means the relay can take mail now and do something with it, so each probe tests the
real thing: the spool by writing a file in it and by the free space left above the submission
reserve (below it every submission gets 452), each listener by reading its SMTP greeting (a bare
TCP connect would succeed against a stuck process too: the kernel completes the handshake), and
the scheduler by its task still running.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import ssl

from mta.spool.store import SpoolStore

PROBE_TIMEOUT = 3.0


def spool_problem(store: SpoolStore, reserve: int) -> str | None:
    """Blocking (run it in a thread): can a file be written in the spool, and is there room?"""
    probe = store.tmp / f"readyz-{secrets.token_hex(4)}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(probe)
        free = store.free_bytes()
    except OSError as exc:
        return f"spool not writable: {exc.strerror or exc}"
    if free < reserve:
        return f"spool free space {free} bytes is below the reserve of {reserve} bytes"
    return None


def probe_address(host: str) -> str:
    """Where to connect to reach a listener bound to `host` (a wildcard means this machine)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


async def listener_problem(host: str, port: int, implicit_tls: bool, timeout: float = PROBE_TIMEOUT) -> str | None:
    """Connect to one listener and expect a 220 greeting (then QUIT)."""
    ctx = None
    if implicit_tls:
        # Only "does it answer?": the certificate is the operator's business, not readiness.
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    name = f"{host}:{port}"
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(probe_address(host), port, ssl=ctx)
            try:
                greeting = await reader.readline()
                if not greeting.startswith(b"220"):
                    text = greeting[:80].decode("ascii", "replace").strip() or "connection closed"
                    return f"listener {name} is not accepting mail: {text}"
                writer.write(b"QUIT\r\n")
                with contextlib.suppress(OSError):
                    await writer.drain()
            finally:
                writer.close()
                with contextlib.suppress(OSError, ssl.SSLError):
                    await writer.wait_closed()
    except TimeoutError:
        return f"listener {name} did not greet within {timeout:g}s"
    except (OSError, ssl.SSLError) as exc:
        return f"listener {name} is not accepting connections: {exc.strerror or exc}"
    return None
