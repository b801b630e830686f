"""`mta serve` itself (uvloop when installed) speaks STARTTLS and AUTH to submission clients."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiosmtplib

from tests.support.pki import TestPki
from tests.support.relay import base_config, deep_merge, listen_address, running, write_config


def test_starttls_and_auth_through_the_real_server(tmp_path: Path) -> None:
    from mta.submission.auth import set_password

    pki = TestPki(tmp_path / "pki")
    leaf = pki.leaf("relay.test")
    users = tmp_path / "users"
    set_password(str(users), "alice", "pw")
    data = deep_merge(base_config(tmp_path), {
        "submission": {"tls_cert": str(leaf.cert_path), "tls_key": str(leaf.key_path), "users_file": str(users),
                       "relay_networks": ["10.0.0.0/8"]},
        "dns": {"nameservers": ["127.0.0.9"], "port": 5399, "timeout": "200ms"}})
    host, port = listen_address(data)

    async def submit() -> str:
        async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, tls_context=pki.client_context()) as c:
            await c.ehlo()
            await c.starttls(server_hostname="relay.test")
            await c.ehlo()
            await c.login("alice", "pw")
            _errors, reply = await c.sendmail("a@src.test", ["b@dst.test"], b"Subject: x\r\n\r\nhi\r\n")
            return reply

    with running(write_config(tmp_path, data), data) as relay:
        assert "queued as" in asyncio.run(submit())
        [ev] = relay.wait_event("accepted")
        assert ev["from"] == "a@src.test"
        assert "pw" not in [str(v) for v in ev.values()]
