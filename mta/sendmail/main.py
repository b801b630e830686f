"""`sendmail` / `mta sendmail`: store a message from stdin (or run SMTP on stdio) with sysexits codes.

Rules:
- The message goes through mta.submission.accept, the listener's own path: the same header
  fields, the same DKIM signature, the same durable write (exit 0 only after the fsync).
- A running `mta serve` learns the new id through a ctl/ request (`new`) and schedules it within
  its ctl poll (0.25 s); with no server running the message waits in the spool and the start-up
  scan picks it up. The write holds the spool's writers' lock shared, so a server starting at
  that moment recovers the spool only after the message is complete.
- Exit codes (sysexits.h): 0 stored, 64 usage, 65 bad data, 67 bad address, 73 the spool cannot be
  created or written, 74 an I/O error, 75 temporary (disk full, spool busy), 78 configuration.
  Errors are one line on stderr; nothing is ever reported stored that is not on disk.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import email.utils
import getpass
import os
import pwd
import socket
import sys
import time
from collections.abc import Sequence

from mta import config as config_mod
from mta import log
from mta.dkim.signer import Signer
from mta.errors import ConfigError, SpoolError
from mta.sendmail import args as args_mod
from mta.sendmail import message
from mta.spool import control
from mta.spool.state import MessageMeta
from mta.spool.store import SpoolStore
from mta.submission.accept import Acceptor, MessageTooBig, Submission
from mta.submission.handler import strip_source_route, valid_address

EX_OK, EX_USAGE, EX_DATAERR, EX_NOUSER = 0, 64, 65, 67
EX_CANTCREAT, EX_IOERR, EX_TEMPFAIL, EX_CONFIG = 73, 74, 75, 78
DEFAULT_CONFIG = "/etc/mta/config.toml"
USAGE = "usage: sendmail [-t] [-i] [-f sender] [-F name] [-bs|-bp|-bm] [-o*] [recipient ...]"


class Exit(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _login() -> str:
    """The caller's login name from its uid (the environment can say anything)."""
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return getpass.getuser()


def spool_exit(exc: SpoolError) -> Exit:
    text = str(exc)
    if "full" in text or "busy" in text:
        return Exit(EX_TEMPFAIL, text)
    if "not writable" in text or "does not exist" in text:
        return Exit(EX_CANTCREAT, text)
    return Exit(EX_IOERR, text)


class LockedAcceptor(Acceptor):
    """The shared acceptance path, each write under the spool's writers' lock (shared)."""

    def store_sync(self, sub: Submission, data: bytes, now: float) -> MessageMeta:
        with self.store.writing():
            return super().store_sync(sub, data, now)


def notify(store: SpoolStore, meta: MessageMeta) -> None:
    """Tell a running server about a new message; without one the start-up scan finds it."""
    if store.is_locked_by_other():
        with contextlib.suppress(OSError):  # a lost notice delays the message until the next start
            control.submit(store, "new", meta.id)


def _check_address(address: str, what: str, hostname: str) -> str:
    """A usable envelope address; a bare local name (cron's `root`) gets `@hostname`, as Postfix's
    append_at_myorigin does."""
    given = address
    address = strip_source_route(address.strip())
    if address and "@" not in address:
        address = f"{address}@{hostname}"
    if not valid_address(address):
        raise Exit(EX_NOUSER, f"{what} {given!r} is not a valid address")
    return address


def deliver(cfg: config_mod.Config, opts: args_mod.Options, raw: bytes, store: SpoolStore, signer: Signer | None,
            now: float) -> MessageMeta:
    """Store one message read from stdin; raises Exit."""
    login = _login()
    sender = f"{login}@{cfg.hostname}" if opts.sender is None else opts.sender
    if sender:
        sender = _check_address(sender, "sender", cfg.hostname)
    full_name = "".join(c for c in opts.full_name if c.isprintable()) if opts.full_name else None
    data, rcpts = message.prepare(raw, ignore_dots=opts.ignore_dots, extract=opts.extract,
                                  sender=sender or f"{login}@{cfg.hostname}", full_name=full_name,
                                  recipients=opts.recipients)
    if not rcpts:
        raise Exit(EX_USAGE, "no recipients (give them as arguments or use -t with To:/Cc:/Bcc:)")
    if len(rcpts) > cfg.submission.max_recipients:
        raise Exit(EX_USAGE, f"too many recipients ({len(rcpts)} > submission.max_recipients)")
    checked = tuple(dict.fromkeys(_check_address(r, "recipient", cfg.hostname) for r in rcpts))
    received = f"by {cfg.hostname} (mta sendmail, from userid {os.getuid()});\r\n\t{email.utils.formatdate(now)}"
    sub = Submission(sender=sender, recipients=checked, raw=data, received=received,
                     client=f"local uid {os.getuid()} ({login})",
                     smtputf8=not all(a.isascii() for a in (sender, *checked)))
    acceptor = LockedAcceptor(store, cfg.hostname, cfg.submission.max_message_size, signer)
    try:
        meta = acceptor.accept_sync(sub, now)
    except MessageTooBig:
        raise Exit(EX_DATAERR, f"message too big (submission.max_message_size = {cfg.submission.max_message_size})")\
            from None
    except SpoolError as exc:
        raise spool_exit(exc) from None
    notify(store, meta)
    return meta


def _read_stdin(limit: int) -> bytes:
    """All of stdin, but never more than `limit` + 1 bytes in memory."""
    chunks: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = os.read(0, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if size > limit:
        raise Exit(EX_DATAERR, f"message too big (submission.max_message_size = {limit})")
    return b"".join(chunks)


async def smtp_on_stdio(cfg: config_mod.Config, store: SpoolStore, signer: Signer | None) -> None:
    """`-bs`: one SMTP session on stdin/stdout, run by the listener's own protocol and handler.
    The local caller may relay (as with plain sendmail); STARTTLS and AUTH are not offered."""
    from mta.submission.handler import SubmissionHandler
    from mta.submission.listener import Listeners, RelaySMTP

    class LocalHandler(SubmissionHandler):
        def may_relay(self, session: object) -> bool:
            return True

    class StdioSMTP(RelaySMTP):
        """The end of stdin ends the session only once what came before it is handled: callers
        write the whole dialogue at once and close the pipe (aiosmtpd would drop the rest)."""

        def eof_received(self) -> bool:
            self._reader.feed_eof()
            return True  # keep our side open to write the remaining replies

        async def handle_exception(self, error: Exception) -> str:
            if not isinstance(error, asyncio.IncompleteReadError):
                return await super().handle_exception(error)
            # Input ended (mid-DATA, a message without its final "." is not accepted): stop.
            transport, self.transport = self.transport, None  # ends aiosmtpd's command loop
            if transport is not None:
                asyncio.get_running_loop().call_soon(transport.close)  # after this reply is written
            return "421 4.4.2 end of input, closing"

    sub_cfg = dataclasses.replace(cfg.submission, tls_cert="", tls_key="", users_file="")
    handler = LocalHandler(sub_cfg, cfg.hostname, store, lambda meta: notify(store, meta))
    handler.acceptor = LockedAcceptor(store, cfg.hostname, sub_cfg.max_message_size, signer)
    listeners = Listeners(sub_cfg, cfg.hostname, handler)
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    await loop.connect_accepted_socket(lambda: listeners.protocol(StdioSMTP), ours)
    reader, writer = await asyncio.open_unix_connection(sock=theirs)

    async def pump_in() -> None:
        while chunk := await asyncio.to_thread(os.read, 0, 1 << 16):
            writer.write(chunk)
            await writer.drain()
        with contextlib.suppress(OSError):
            writer.write_eof()

    feeder = asyncio.create_task(pump_in())
    try:
        while chunk := await reader.read(1 << 16):
            await asyncio.to_thread(_write_all, 1, chunk)
    finally:
        feeder.cancel()  # a thread blocked in read(0) ends with the process
        writer.close()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def run(cfg_path: str, argv: Sequence[str]) -> int:
    """The whole command; returns the exit code."""
    try:
        opts = args_mod.parse(argv)
    except args_mod.UsageError as exc:
        print(f"sendmail: {exc}\n{USAGE}", file=sys.stderr)
        return EX_USAGE
    try:
        cfg = config_mod.load(cfg_path, os.environ)  # the MTA_* overrides apply as for every command
        log.configure(cfg.log.format, "info" if opts.verbose else "warning")
        if opts.mode == "queue":
            from mta.cli import cmd_queue_list

            return cmd_queue_list(cfg, argparse.Namespace(json=False))
        signer = Signer.from_config(cfg) if cfg.dkim.enabled else None
        store = SpoolStore(cfg.queue.path)
        store.prepare()
        if opts.mode == "smtp":
            asyncio.run(smtp_on_stdio(cfg, store, signer))
            return EX_OK
        raw = _read_stdin(cfg.submission.max_message_size)
        meta = deliver(cfg, opts, raw, store, signer, time.time())
        if opts.verbose:
            print(f"sendmail: queued as {meta.id}", file=sys.stderr)
        return EX_OK
    except ConfigError as exc:
        print(f"sendmail: {exc}", file=sys.stderr)
        return EX_CONFIG
    except SpoolError as exc:
        failure = spool_exit(exc)
        print(f"sendmail: {failure}", file=sys.stderr)
        return failure.code
    except Exit as exc:
        print(f"sendmail: {exc}", file=sys.stderr)
        return exc.code
    except OSError as exc:
        print(f"sendmail: {exc}", file=sys.stderr)
        return EX_IOERR


def mta_main(argv: Sequence[str]) -> int:
    """`mta sendmail [--config F] [flags] [rcpt...]` (--config first, like every mta command)."""
    rest: list[str] = []
    cfg_path = os.environ.get("MTA_CONFIG") or "config.toml"
    items = iter(argv)
    for arg in items:
        if arg == "--config":
            cfg_path = next(items, "")
            if not cfg_path:
                print(f"sendmail: --config needs a file\n{USAGE}", file=sys.stderr)
                return EX_USAGE
        elif arg.startswith("--config="):
            cfg_path = arg.partition("=")[2]
        else:
            rest.append(arg)
    return run(cfg_path, rest)


def script_main() -> int:
    """The bare `sendmail` command: callers cannot pass our options, so the config comes from MTA_CONFIG."""
    return run(os.environ.get("MTA_CONFIG") or DEFAULT_CONFIG, sys.argv[1:])
