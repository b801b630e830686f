"""Command-line interface: parses arguments, formats output and exit codes; no business logic.

    mta serve | check-config | queue list|show|flush|delete|hold|release | passwd | policy | tlsrpt
        | dkim keygen|check | sendmail | cluster status | sandbox (needs mta[testing])
Every command takes --config F (default: $MTA_CONFIG, else config.toml). Exit codes: 0 ok, 1 error, 2 usage.
"""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import json
import os
import sys

from mta import config as config_mod
from mta import log, runtime
from mta.errors import MtaError, SpoolError
from mta.spool import control
from mta.spool.files import describe_os_error
from mta.spool.store import SpoolStore
from mta.spool.view import header_text, load_all, meta_json
from mta.spool.view import iso as _iso


def cmd_queue_list(cfg: config_mod.Config, args: argparse.Namespace) -> int:
    metas = load_all(SpoolStore(cfg.queue.path))
    if args.json:
        print(json.dumps([meta_json(m) for m in metas], indent=1))
        return 0
    if not metas:
        print("Mail queue is empty")
        return 0
    print(f"{'-Queue ID-':<22} {'--Size--':>8} {'----Arrival Time----':<20} -Sender/Recipient-")
    for m in metas:
        flag = "!" if m.held else ""
        print(f"{m.id + flag:<22} {m.size:>8} {_iso(m.created) or '':<20} {m.sender or 'MAILER-DAEMON'}")
        for r in m.recipients:
            if r.status.final:
                continue
            if r.last_error:
                print(f"{'':<22} ({r.last_error[:120]})")
            print(f"{'':<52} {r.address}  [{r.status.value}, attempts {r.attempts}]")
    print(f"-- {len(metas)} message(s)")
    return 0


def cmd_queue_show(cfg: config_mod.Config, args: argparse.Namespace) -> int:
    store = SpoolStore(cfg.queue.path)
    meta = store.load_sync(args.id)
    print(json.dumps(meta_json(meta), indent=1))
    print(header_text(store, args.id))
    return 0


def cmd_queue_op(cfg: config_mod.Config, args: argparse.Namespace) -> int:
    store = SpoolStore(cfg.queue.path)
    store.prepare()
    qid = getattr(args, "id", None)
    if qid and not store.exists(qid):
        print(f"mta: no such message {qid}", file=sys.stderr)
        return 1
    if store.is_locked_by_other():
        try:
            control.submit(store, args.op, qid)
        except OSError as exc:  # e.g. ENOSPC: the request file does not fit
            raise SpoolError(f"cannot pass the request to the running server: {describe_os_error(exc)}") from None
        print(f"{args.op}: request passed to the running server")
        return 0
    store.lock()
    try:
        n = control.apply_offline(store, args.op, qid)
    finally:
        store.unlock()
    print(f"{args.op}: {n} message(s)")
    return 0


def cmd_serve(cfg: config_mod.Config, args: argparse.Namespace) -> int:
    runtime.catch_early_stop()  # first: a stop request during start-up is honoured, not lost (CTR-4)
    from mta import preflight
    from mta.app import serve

    preflight.check(cfg)  # the same checks as check-config, before anything starts (issue 10 item 9)
    for warning in preflight.warnings(cfg):
        log.event("config-warning", reason=warning)

    store: SpoolStore | None = None
    child: list[tuple[int, int]] | None = None
    if cfg.submission.separate_process:
        # Lock, make the spool safe to write to, THEN fork the listener children (that step deletes
        # half-written files, which must never be the child's), all before any event loop or
        # thread exists. Reading the queued messages happens after, in the background (PERF-4).
        from mta.spool.recovery import before_listening
        from mta.submission.process import spawn_all

        store = SpoolStore(cfg.queue.path)
        store.prepare()
        store.lock()
        assert store._lock_fd is not None
        before_listening(store)
        child = spawn_all(cfg, store._lock_fd)  # [submission] processes children (PERF-5)
    return runtime.run(serve(cfg, store, child, prepared=store is not None))


def cmd_check_config(cfg: config_mod.Config, args: argparse.Namespace) -> int:
    from mta import preflight

    preflight.check(cfg)
    for warning in preflight.warnings(cfg):
        print(f"warning: {warning}", file=sys.stderr)
    applied = config_mod.env_applied(os.environ)
    print(f"{cfg.source}: ok" + (f" (overridden by {', '.join(applied)})" if applied else ""))
    return 0


def cmd_passwd(args: argparse.Namespace) -> int:
    from mta.submission.auth import set_password

    if sys.stdin.isatty():
        password = getpass.getpass(f"Password for {args.user}: ")
        if getpass.getpass("Again: ") != password:
            print("mta: passwords differ", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    try:
        set_password(args.users_file, args.user, password)
    except ValueError as exc:
        print(f"mta: {exc}", file=sys.stderr)
        return 1
    print(f"{args.users_file}: user {args.user} set")
    return 0


def cmd_sandbox(args: argparse.Namespace) -> int:
    # mta.testing sits above the relay (it may import any of mta, never the reverse): the CLI, the
    # composition root, loads it only for this command, so `import mta` never needs trustme (KIT-5).
    try:
        from mta.testing import sandbox
    except ImportError as exc:
        print(f"mta: sandbox needs the testing extra (pip install 'mta[testing]'): {exc}", file=sys.stderr)
        return 1
    return sandbox.main(port=args.port)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mta", description="Outbound SMTP relay that enforces MTA-STS")
    common = argparse.ArgumentParser(add_help=False)
    # MTA_CONFIG: a container or unit file names the config once for every command (issue 19).
    common.add_argument("--config", default=os.environ.get("MTA_CONFIG") or "config.toml",
                        help="configuration file (TOML); default $MTA_CONFIG, else config.toml")
    common.add_argument("--log-format", choices=("text", "json"), help="override [log] format")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", parents=[common], help="run the relay").set_defaults(func=cmd_serve)
    sub.add_parser("check-config", parents=[common], help="validate the configuration").set_defaults(
        func=cmd_check_config)
    q = sub.add_parser("queue", help="inspect and manage the spool").add_subparsers(dest="queue_cmd", required=True)
    ql = q.add_parser("list", parents=[common], help="list queued messages")
    ql.add_argument("--json", action="store_true")
    ql.set_defaults(func=cmd_queue_list)
    qs = q.add_parser("show", parents=[common], help="show one message")
    qs.add_argument("id")
    qs.set_defaults(func=cmd_queue_show)
    qf = q.add_parser("flush", parents=[common], help="retry deferred mail now")
    qf.add_argument("id", nargs="?")
    qf.set_defaults(func=cmd_queue_op, op="flush")
    for op in ("delete", "hold", "release"):
        qo = q.add_parser(op, parents=[common], help=f"{op} one message")
        qo.add_argument("id")
        qo.set_defaults(func=cmd_queue_op, op=op)
    pw = sub.add_parser("passwd", help="add or change an AUTH user")
    pw.add_argument("--users-file", required=True)
    pw.add_argument("user")
    pw.set_defaults(func=None, raw=cmd_passwd)
    from mta.cli_policy import add_policy_parser

    add_policy_parser(sub, common)
    from mta.cli_tlsrpt import add_tlsrpt_parser

    add_tlsrpt_parser(sub, common)
    from mta.cli_cluster import add_cluster_parser

    add_cluster_parser(sub, common)
    from mta.cli_dkim import add_dkim_parser

    add_dkim_parser(sub, common)
    sb = sub.add_parser("sandbox", help="a simulated Internet with demo domains and a relay, for trying mta "
                        "(needs the mta[testing] extra); Ctrl-C stops")
    sb.add_argument("--port", type=int, help="submission port on 127.0.0.1 (default: a free one)")
    sb.set_defaults(func=None, raw=cmd_sandbox)
    # Listed for --help only: main() hands `mta sendmail ...` to mta.sendmail before argparse.
    sub.add_parser("sendmail", help="sendmail-compatible submission: mta sendmail [--config F] [-t] [-i] ... [rcpt]")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["sendmail"]:
        # sendmail's flags (-t, -FCronDaemon, -oi ...) are not argparse's: its own parser takes them.
        from mta.sendmail.main import mta_main

        return mta_main(argv[1:])
    args = build_parser().parse_args(argv)
    if getattr(args, "raw", None):
        return int(args.raw(args))
    try:
        cfg = config_mod.load(args.config, os.environ)
        if args.log_format:
            cfg = dataclasses.replace(cfg, log=dataclasses.replace(cfg.log, format=args.log_format))
        log.configure(cfg.log.format, cfg.log.level)
        return int(args.func(cfg, args))
    except MtaError as exc:
        print(f"mta: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        # A file the configuration names is missing or unusable: one line, not a traceback.
        print(f"mta: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
