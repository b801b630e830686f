"""Relay and AUTH abuse against the submission listener (hardening issue, part 3), over real sockets.

- A table of open-relay probes (PROBES, 44 of them) from 127.0.0.3 against a listener on 127.0.0.2
  whose relay_networks exclude the client: every one is refused (no RCPT gets 2xx, nothing spooled).
  Controls show the same harness does see relaying when it is allowed.
- AUTH brute force is slowed per client address, also across parallel connections, and logged.
- An unknown user costs as much time as a wrong password (no user enumeration).
- Secrets never reach a log record: not the password, not its base64 forms, in any AUTH path.
Checklist: none of these has an item of its own; they guard SMTP-43's submission side (we are a
relay only for relay_networks or after AUTH over TLS).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mta.log import JsonFormatter, TextFormatter
from mta.submission.auth import set_password
from tests.support.pki import TestPki
from tests.support.relay import base_config, deep_merge, listen_address, running, write_config
from tests.support.submission import RawClient, Server, start_server

SERVER_IP, CLIENT_IP = "127.0.0.2", "127.0.0.3"
USER, PASSWORD = "alice", "s3cr3t-P@ss!"
MSG = b"From: a@src.test\r\nTo: victim@dst.test\r\nSubject: relay test\r\n\r\nhello\r\n"


def b64(text: str) -> bytes:
    return base64.b64encode(text.encode())


@pytest.fixture
def pki(tmp_path: Path) -> TestPki:
    return TestPki(tmp_path / "pki")


@pytest.fixture
async def make_server(tmp_path: Path, pki: TestPki) -> AsyncIterator[Callable[..., Any]]:
    """A listener with TLS and one user (alice); relay_networks exclude 127.0.0.3 unless told."""
    started: list[Server] = []
    users = tmp_path / "users"
    set_password(str(users), USER, PASSWORD)
    leaf = pki.leaf("relay.test", SERVER_IP)

    async def make(**sub: Any) -> Server:
        settings = {"listen": [f"{SERVER_IP}:0"], "relay_networks": ["127.0.0.2/32", "10.0.0.0/8"],
                    "users_file": str(users), "tls_cert": str(leaf.cert_path), "tls_key": str(leaf.key_path),
                    "auth_failure_delay": "10ms", **sub}
        srv = await start_server(tmp_path / f"q{len(started)}", tmp_path, **settings)
        started.append(srv)
        return srv

    yield make
    for srv in started:
        await srv.listeners.stop()


class Raw(RawClient):
    """RawClient bound to a chosen source address; `cmd` adds the CRLF."""

    @classmethod
    async def open(cls, srv: Server, source: str = CLIENT_IP) -> Raw:
        raw = await cls.connect(srv.host, srv.port, source=source)
        assert isinstance(raw, Raw)
        return raw

    async def cmd(self, line: bytes, timeout: float = 5) -> bytes:
        return await self.send(line + b"\r\n", timeout)

    async def starttls(self, ctx: ssl.SSLContext) -> None:
        assert (await self.cmd(b"STARTTLS")).startswith(b"220")
        await self.writer.start_tls(ctx, server_hostname="relay.test")


# --- the probe table --------------------------------------------------------------------------

STARTTLS = b"<starttls>"  # marker: upgrade the connection here, then EHLO again


@dataclass(frozen=True)
class Probe:
    name: str
    rcpts: tuple[bytes, ...] = (b"<victim@dst.test>",)
    mail: bytes = b"<a@src.test>"
    before: tuple[bytes, ...] = ()  # command lines between EHLO and MAIL (replies not checked)
    helo: bytes = b"EHLO probe.test"
    first: bytes = b""  # a line sent before HELO/EHLO


_PLAIN_OK = b"AUTH PLAIN " + b64(f"\0{USER}\0{PASSWORD}")
PROBES = [
    Probe("plain"),
    Probe("percent_hack_our_name", (b"<victim%dst.test@relay.test>",)),
    Probe("percent_hack_our_ip", (b"<victim%dst.test@[127.0.0.2]>",)),
    Probe("percent_hack_localhost", (b"<victim%dst.test@localhost>",)),
    Probe("percent_in_domain", (b"<victim@dst.test%relay.test>",)),
    Probe("quoted_at", (b'<"victim@dst.test"@relay.test>',)),
    Probe("quoted_at_ip_literal", (b'<"victim@dst.test"@[127.0.0.2]>',)),
    Probe("quoted_no_domain", (b'<"victim@dst.test">',)),
    Probe("source_route", (b"<@relay.test:victim@dst.test>",)),
    Probe("source_route_two_hops", (b"<@relay.test,@hop.test:victim@dst.test>",)),
    Probe("double_at", (b"<victim@dst.test@relay.test>",)),
    Probe("bang_path", (b"<dst.test!victim@relay.test>",)),
    Probe("bare_bang_path", (b"<dst.test!victim>",)),
    Probe("ip_literal_ours", (b"<victim@[127.0.0.2]>",)),
    Probe("ip_literal_external", (b"<victim@[192.0.2.1]>",)),
    Probe("ipv6_literal", (b"<victim@[IPv6:::1]>",)),
    Probe("ipv6_mapped_literal", (b"<victim@[IPv6:::ffff:127.0.0.2]>",)),
    Probe("upper_case", (b"<VICTIM@DST.TEST>",)),
    Probe("trailing_dot", (b"<victim@dst.test.>",)),
    Probe("our_name_upper_trailing_dot", (b"<victim@RELAY.TEST.>",)),
    Probe("our_own_hostname", (b"<victim@relay.test>",)),
    Probe("bare_postmaster", (b"<postmaster>",)),
    Probe("postmaster_ours", (b"<postmaster@relay.test>",)),
    Probe("localhost", (b"<victim@localhost>",)),
    Probe("no_angle_brackets", (b"victim@dst.test",)),
    Probe("spaces_in_path", (b"< victim@dst.test >",)),
    Probe("esmtp_params", (b"<victim@dst.test> NOTIFY=NEVER",)),
    Probe("utf8_address", ("<vïctim@dst.test>".encode(),), mail=b"<a@src.test> SMTPUTF8"),
    Probe("second_rcpt_after_local", (b"<postmaster@relay.test>", b"<victim@dst.test>")),
    Probe("mail_from_forged_local", mail=b"<postmaster@relay.test>"),
    Probe("mail_from_forged_ip_literal", mail=b"<a@[127.0.0.2]>"),
    Probe("mail_from_null", mail=b"<>"),
    Probe("helo_forged_as_us", helo=b"EHLO relay.test"),
    Probe("helo_forged_ip_literal", helo=b"EHLO [127.0.0.2]"),
    Probe("helo_not_ehlo", helo=b"HELO probe.test"),
    Probe("lower_case_commands", (b"<victim@dst.test>",), helo=b"ehlo probe.test"),
    Probe("xclient_spoof", before=(b"XCLIENT ADDR=127.0.0.2 NAME=relay.test",)),
    Probe("proxy_header_spoof", first=b"PROXY TCP4 127.0.0.2 127.0.0.2 40000 25"),
    Probe("auth_plain_before_tls", before=(_PLAIN_OK,)),
    Probe("auth_login_before_tls", before=(b"AUTH LOGIN", b64(USER), b64(PASSWORD))),
    Probe("starttls_without_auth", before=(STARTTLS,)),
    Probe("auth_nonexistent_user", before=(STARTTLS, b"AUTH PLAIN " + b64(f"\0mallory\0{PASSWORD}"))),
    Probe("auth_wrong_password", before=(STARTTLS, b"AUTH LOGIN", b64(USER), b64("guess"))),
    Probe("auth_before_tls_then_starttls", before=(_PLAIN_OK, STARTTLS)),
]


@dataclass
class Outcome:
    probe: str
    mail: bytes
    rcpts: list[bytes]
    relayed: bool

    @property
    def refused(self) -> bool:
        """Refused for relaying: nothing queued, and MAIL or every RCPT answered 5xx."""
        return not self.relayed and (self.mail[:1] == b"5" or all(r[:1] == b"5" for r in self.rcpts))


async def run_probe(srv: Server, probe: Probe, ctx: ssl.SSLContext, source: str = CLIENT_IP) -> Outcome:
    c = await Raw.open(srv, source)
    try:
        if probe.first:
            await c.cmd(probe.first)
        assert (await c.cmd(probe.helo)).startswith(b"250")
        for line in probe.before:
            if line == STARTTLS:
                await c.starttls(ctx)
                assert (await c.cmd(probe.helo)).startswith(b"250")
            else:
                await c.cmd(line)
        mail = (await c.cmd(b"MAIL FROM:" + probe.mail))[:3]
        rcpts = [(await c.cmd(b"RCPT TO:" + r))[:3] for r in probe.rcpts] if mail == b"250" else []
        relayed = False
        if any(r[:1] == b"2" for r in rcpts) and (await c.cmd(b"DATA")).startswith(b"354"):
            relayed = (await c.cmd(MSG + b".")).startswith(b"250")
        await c.cmd(b"QUIT")
        return Outcome(probe.name, mail, rcpts, relayed)
    finally:
        c.close()


async def test_open_relay_probe_table_all_refused(make_server: Callable[..., Any], pki: TestPki) -> None:
    """Every probe of the table, from 127.0.0.3 (outside relay_networks), is refused; none is spooled."""
    assert len(PROBES) >= 30 and len({p.name for p in PROBES}) == len(PROBES)
    srv = await make_server()
    ctx = pki.client_context()
    outcomes = [await run_probe(srv, probe, ctx) for probe in PROBES]
    table = "\n".join(f"{o.probe:32} MAIL {o.mail.decode()} RCPT {[r.decode() for r in o.rcpts]}"
                      for o in outcomes)
    refused = [o for o in outcomes if o.refused]
    assert len(refused) == len(PROBES), f"{len(refused)}/{len(PROBES)} refused:\n{table}"
    assert srv.accepted == [] and srv.store.ids() == []
    # Relay control answers 554 5.7.1 for every well-formed recipient that got as far as the check.
    by_name = {o.probe: o for o in outcomes}
    for name in ("plain", "percent_hack_our_name", "quoted_at", "our_own_hostname", "auth_nonexistent_user",
                 "auth_wrong_password", "auth_plain_before_tls", "mail_from_forged_local", "xclient_spoof"):
        assert by_name[name].rcpts == [b"554"], (name, by_name[name])


async def test_open_relay_probe_controls_detect_relaying(make_server: Callable[..., Any], pki: TestPki) -> None:
    """Controls for the table: from inside relay_networks the plain probe relays, and so does AUTH over
    TLS with the right password from outside, so the harness is able to see an open relay."""
    inside = await make_server(relay_networks=[f"{CLIENT_IP}/32"])
    assert (await run_probe(inside, PROBES[0], pki.client_context())).relayed
    outside = await make_server()
    authed = Probe("auth_ok", before=(STARTTLS, _PLAIN_OK))
    outcome = await run_probe(outside, authed, pki.client_context())
    assert outcome.relayed and not outcome.refused
    assert len(outside.accepted) == 1


def test_open_relay_mta_serve_end_to_end(tmp_path: Path) -> None:
    """One probe against a real `mta serve` on 127.0.0.2 (relay_networks excluding 127.0.0.3): 554 5.7.1
    and a `refused` event in the JSON log."""
    data = deep_merge(base_config(tmp_path, host=SERVER_IP), {"submission": {"relay_networks": ["127.0.0.2/32"]}})
    path = write_config(tmp_path, data)
    with running(path, data) as relay:
        host, port = listen_address(data)
        with socket.socket() as s:
            s.settimeout(5)
            s.bind((CLIENT_IP, 0))
            s.connect((host, port))
            f = s.makefile("rwb")
            assert f.readline().startswith(b"220")
            replies = []
            for line in (b"EHLO probe.test", b"MAIL FROM:<a@src.test>", b"RCPT TO:<victim%dst.test@relay.test>"):
                f.write(line + b"\r\n")
                f.flush()
                while (reply := f.readline())[3:4] == b"-":
                    pass
                replies.append(reply[:9])
        assert [r[:3] for r in replies] == [b"250", b"250", b"554"] and replies[2] == b"554 5.7.1"
        events = relay.wait_event("refused", reason="relay access denied", timeout=10)
        assert events[0]["client"] == CLIENT_IP and events[0]["recipient"] == "victim%dst.test@relay.test"
        assert relay.events("accepted") == []


# --- AUTH brute force -------------------------------------------------------------------------

async def auth_plain(srv: Server, user: str, password: str, source: str = CLIENT_IP) -> tuple[bytes, float]:
    """One AUTH PLAIN (insecure AUTH allowed in these tests) on a fresh connection: (reply code, seconds)."""
    c = await Raw.open(srv, source)
    try:
        assert (await c.cmd(b"EHLO probe.test")).startswith(b"250")
        t0 = time.monotonic()
        reply = await c.cmd(b"AUTH PLAIN " + b64(f"\0{user}\0{password}"), timeout=10)
        return reply[:3], time.monotonic() - t0
    finally:
        c.close()


async def test_auth_brute_force_slowed_across_parallel_connections(make_server: Callable[..., Any],
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """Six guesses on six parallel connections from one address take their turns, each after a delay of
    0.1 s per earlier failure (>= 1.5 s in all), and each is logged with the user name. Another address
    is not slowed, and a success clears the count."""
    caplog.set_level(logging.INFO, logger="mta.event")
    srv = await make_server(allow_insecure_auth=True, auth_failure_delay="100ms")
    t0 = time.monotonic()
    results = await asyncio.gather(*(auth_plain(srv, USER, f"guess{i}") for i in range(6)))
    elapsed = time.monotonic() - t0
    assert [code for code, _ in results] == [b"535"] * 6
    assert elapsed >= 0.1 * (0 + 1 + 2 + 3 + 4 + 5), elapsed
    assert srv.listeners.limits.auth_failures[CLIENT_IP] == 6
    refused = [r for r in caplog.records if getattr(r, "mta_event", {}).get("reason") == "authentication failed"]
    assert len(refused) == 6
    assert {r.mta_event["user"] for r in refused} == {USER}  # type: ignore[attr-defined]
    assert {r.mta_event["client"] for r in refused} == {CLIENT_IP}  # type: ignore[attr-defined]

    code, took = await auth_plain(srv, USER, PASSWORD, source="127.0.0.4")
    assert code == b"235" and took < 0.5  # per address: a neighbour is not slowed
    code, took = await auth_plain(srv, USER, PASSWORD)
    assert code == b"235" and took >= 0.6  # still slowed (capped), but the right password works
    assert CLIENT_IP not in srv.listeners.limits.auth_failures  # a success clears the count


async def test_auth_unknown_user_costs_a_password_check(make_server: Callable[..., Any]) -> None:
    """No user enumeration by timing: AUTH as a nonexistent user takes as long as a wrong password
    (both run scrypt). Each try comes from a fresh address so no failure delay is added."""
    srv = await make_server(allow_insecure_auth=True, auth_failure_delay="1ms")
    unknown, wrong = [], []
    for i in range(3):
        code, took = await auth_plain(srv, "mallory", PASSWORD, source=f"127.0.1.{i + 1}")
        assert code == b"535"
        unknown.append(took)
        code, took = await auth_plain(srv, USER, "guess", source=f"127.0.2.{i + 1}")
        assert code == b"535"
        wrong.append(took)
    assert min(unknown) >= 0.5 * min(wrong), (unknown, wrong)


# --- secrets in logs --------------------------------------------------------------------------

SECRETS = [PASSWORD, "wrong-Pa55word", "raw-not-base64-Secret"]


def secret_forms() -> list[str]:
    forms = []
    for pw in SECRETS:
        forms += [pw, b64(pw).decode(), b64(f"\0{USER}\0{pw}").decode(), b64(f"\0mallory\0{pw}").decode(),
                  b64(f"{USER}\0{USER}\0{pw}").decode(), repr(pw.encode())[2:-1]]
    return forms


async def test_auth_secrets_never_logged(make_server: Callable[..., Any], pki: TestPki,
                                         caplog: pytest.LogCaptureFixture) -> None:
    """Every AUTH path, including a client that keeps sending base64 lines after a refused AUTH and one
    that sends a raw password where base64 was due: with all loggers at DEBUG, no record (formatted as
    text, JSON or by pytest) holds a password or any base64 form of it. The user name is logged."""
    caplog.set_level(logging.DEBUG)
    for name in ("mail.log", "mta.event", "asyncio"):
        caplog.set_level(logging.DEBUG, logger=name)
    srv = await make_server()
    ctx = pki.client_context()
    c = await Raw.open(srv)
    try:
        assert (await c.cmd(b"EHLO probe.test")).startswith(b"250")
        # Before TLS: refused with 538, but a pipelining client sends its credentials anyway.
        assert (await c.cmd(b"AUTH PLAIN " + b64(f"\0{USER}\0{PASSWORD}"))).startswith(b"538")
        assert (await c.cmd(b"auth plain " + b64(f"\0{USER}\0{PASSWORD}"))).startswith(b"5")
        assert (await c.cmd(b"AUTH LOGIN")).startswith(b"538")
        assert (await c.cmd(b64(USER))).startswith(b"500")
        assert (await c.cmd(b64(PASSWORD))).startswith(b"500")
        await c.starttls(ctx)
        assert (await c.cmd(b"EHLO probe.test")).startswith(b"250")
        assert (await c.cmd(b"AUTH PLAIN " + b64(f"\0{USER}\0wrong-Pa55word"))).startswith(b"535")
        assert (await c.cmd(b"AUTH PLAIN " + b64(f"\0mallory\0{PASSWORD}"))).startswith(b"535")
        assert (await c.cmd(b"AUTH LOGIN")).startswith(b"334")
        assert (await c.cmd(b64(USER))).startswith(b"334")
        assert (await c.cmd(b"raw-not-base64-Secret"))[:1] == b"5"
        assert (await c.cmd(b"AUTH PLAIN")).startswith(b"334")
        assert (await c.cmd(b64(f"{USER}\0{USER}\0wrong-Pa55word"))).startswith(b"535")
        assert (await c.cmd(b"AUTH LOGIN " + b64(USER))).startswith(b"334")
        assert (await c.cmd(b64(PASSWORD))).startswith(b"235")
        assert (await c.cmd(b"MAIL FROM:<a@src.test>")).startswith(b"250")
        assert (await c.cmd(b"RCPT TO:<victim@dst.test>")).startswith(b"250")
    finally:
        c.close()
    await asyncio.sleep(0.05)
    records = caplog.records
    assert len(records) > 20  # the capture works: aiosmtpd and our events were recorded
    rendered = [caplog.text]
    for fmt in (TextFormatter(), JsonFormatter()):
        rendered += [fmt.format(r) for r in records]
    rendered += [json.dumps(getattr(r, "mta_event", None), default=str) for r in records]
    rendered += [repr(r.args) for r in records]
    text = "\n".join(rendered)
    leaks = [form for form in secret_forms() if form in text]
    assert leaks == [], leaks
    assert f"user={USER}" in text and "authentication failed" in text  # brute force stays visible
