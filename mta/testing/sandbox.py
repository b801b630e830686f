"""`mta sandbox`: a simulated Internet and a relay in one command, for trying mta by hand (KIT-6).

It starts a World (DNS, test CA, policy hosts, MX hosts on 127.0.0.x) with demo domains, one
`mta serve` wired to it, prints the submission address and a `swaks` line per domain, then prints
each delivery, deferral and bounce from the relay's JSON log as it happens. SIGINT (Ctrl-C) or
SIGTERM stops everything and exits 0. Nothing needs root or the Internet.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from mta.testing.relay import RelayProcess
from mta.testing.world import World

SENDER = "alice@src.test"
OUTCOMES = ("delivered", "deferred", "bounced")


@dataclass(frozen=True)
class Demo:
    domain: str
    what: str  # what the reader should expect, one line
    cert: str | None  # the MX host's certificate kind (None: no STARTTLS)
    sts_mode: str | None  # None: no MTA-STS policy published
    null_mx: bool = False


DEMOS = (
    Demo("enforce.demo", "MTA-STS enforce, valid certificate: delivered over verified TLS", "valid", "enforce"),
    Demo("wrongcert.demo", "MTA-STS enforce, certificate for another name: deferred, never sent", "wrong-name",
         "enforce"),
    Demo("testing.demo", "MTA-STS testing, certificate for another name: delivered anyway, failure logged",
         "wrong-name", "testing"),
    Demo("nopolicy.demo", "no MTA-STS policy, no STARTTLS: delivered in plain text (opportunistic)", None, None),
    Demo("nullmx.demo", "null MX (RFC 7505): bounced at once, a DSN goes to the sender", None, None, null_mx=True),
)


def build(world: World) -> None:
    """Publish the demo domains in `world`."""
    for demo in DEMOS:
        if demo.null_mx:
            world.domain(demo.domain, [(0, ".")])
            continue
        mx = f"mx1.{demo.domain}"
        world.mx_host(mx, cert=demo.cert)
        world.domain(demo.domain, [(10, mx)])
        if demo.sts_mode is not None:
            world.sts(demo.domain, demo.sts_mode, [mx])


def describe(ev: dict[str, Any]) -> str | None:
    """One line for a delivered/deferred/bounced log event; None for any other event."""
    name = ev.get("event")
    if name not in OUTCOMES:
        return None
    rcpt, qid = ev.get("recipient"), ev.get("queue_id")
    if name == "delivered":
        tls = ev.get("tls") or "none"
        verified = "verified" if ev.get("verified") else "not verified"
        sts = f"MTA-STS {ev['sts_mode']}" if ev.get("sts_mode") else "no MTA-STS"
        return f"delivered  {rcpt} via {ev.get('mx')} (TLS {tls}, {verified}, {sts}) [{qid}]"
    reply = ev.get("reply") if ev.get("reply") not in (None, "", "None") else None
    why = (reply if name == "bounced" else None) or ev.get("reason") or reply or ""
    return f"{name:<9}  {rcpt}: {ev.get('status') or ''} {why} [{qid}]".replace("  [", " [")


def follow(relay: RelayProcess, out: TextIO, stop: threading.Event, poll: float = 0.1) -> None:
    """Print outcome lines from the relay's log until `stop` is set."""
    offset = 0
    while not stop.wait(poll):
        if not relay.log_path.exists():
            continue
        with open(relay.log_path, "rb") as f:
            f.seek(offset)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1  # only whole lines; the rest is read next time
        offset += end
        for line in chunk[:end].splitlines():
            with contextlib.suppress(ValueError):
                text = describe(json.loads(line))
                if text:
                    print(text, file=out, flush=True)


def banner(relay: RelayProcess) -> str:
    host, port = relay.address
    lines = [f"mta sandbox: relay listening on {host}:{port} (SMTP submission; no AUTH needed from {host})",
             f"Every name below exists only here. Mail from any sender, e.g. {SENDER}; bounces go to its MX.", ""]
    for demo in DEMOS:
        lines.append(f"# {demo.domain}: {demo.what}")
        lines.append(f"swaks --server {host}:{port} --from {SENDER} --to bob@{demo.domain}")
    lines += ["", "Deliveries, deferrals and bounces appear below as they happen. Ctrl-C stops.", ""]
    return "\n".join(lines)


def main(port: int | None = None, out: TextIO = sys.stdout) -> int:
    """Run the sandbox until SIGINT/SIGTERM: 0 after a clean stop, 1 if the relay died meanwhile."""
    stop = threading.Event()
    status = 0
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    tmp = Path(tempfile.mkdtemp(prefix="mta-sandbox-"))
    world: World | None = None
    try:
        world = World(tmp)
        build(world)
        extra: dict[str, Any] = {"delivery": {"retry_intervals": ["1m"]}}  # one deferral line a minute
        if port is not None:
            extra["submission"] = {"listen": [f"127.0.0.1:{port}"]}
        relay = world.relay(extra)
        print(banner(relay), file=out, flush=True)
        printer = threading.Thread(target=follow, args=(relay, out, stop), name="sandbox-log", daemon=True)
        printer.start()
        while not stop.wait(0.5):  # a timed wait, so the main thread runs the signal handler promptly
            if relay.proc is not None and relay.proc.poll() is not None:
                print(f"mta sandbox: the relay stopped unexpectedly; its log:\n{relay.log_text()[-3000:]}",
                      file=sys.stderr, flush=True)
                status = 1
                stop.set()
        printer.join(timeout=2)
        print("mta sandbox: stopped", file=out, flush=True)
    finally:
        for sig in previous:  # a second Ctrl-C must not interrupt the cleanup
            signal.signal(sig, signal.SIG_IGN)
        if world is not None:
            world.close()
        shutil.rmtree(tmp, ignore_errors=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return status
