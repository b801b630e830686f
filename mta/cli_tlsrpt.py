"""`mta tlsrpt`: show or send the TLS reports (RFC 8460) of one UTC day.

    mta tlsrpt show [--date YYYY-MM-DD] [--json]   the report JSON per policy domain and its rua targets
    mta tlsrpt send [--date YYYY-MM-DD] [--json]   send that day's reports now (default: yesterday, UTC)

Rule: the same code as the server's daily run (mta.tlsrpt.sender), on the same database, so a
report is never sent twice for one day and domain, whoever sends it. `send` works while
`mta serve` runs: report mails go into the spool and a ctl/ flush request makes the running
relay deliver them; its counters reach the database within a flush interval, which `send` and
`show` wait out first. Today is allowed (a partial day; later sessions of today are then not
reported). Exit 0 when nothing failed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
from typing import Any

from mta.config import Config
from mta.spool import control
from mta.spool.state import MessageMeta
from mta.spool.store import SpoolStore

SERVER_FLUSH_WAIT = 1.5  # the server flushes its counters every second (ResultStore flush_interval)


def _day(text: str) -> datetime.date:
    try:
        return datetime.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (YYYY-MM-DD)") from None


def add_tlsrpt_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    t = sub.add_parser("tlsrpt", help="TLS reports (RFC 8460)").add_subparsers(dest="tlsrpt_cmd", required=True)
    for name, func, text in (("show", cmd_show, "print the reports that would be sent"),
                             ("send", cmd_send, "send the reports of a day now")):
        p = t.add_parser(name, parents=[common], help=text)
        p.add_argument("--date", type=_day, help="UTC day YYYY-MM-DD (default: yesterday)")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=func)


def _which_day(args: argparse.Namespace) -> datetime.date:
    day: datetime.date | None = args.date
    return day or datetime.datetime.now(datetime.UTC).date() - datetime.timedelta(days=1)


async def _run(cfg: Config, args: argparse.Namespace, send: bool) -> int:
    from mta.net.dns import Resolver
    from mta.tlsrpt.sender import ReportSender
    from mta.tlsrpt.store import ResultStore

    day = _which_day(args)
    store = SpoolStore(cfg.queue.path)
    server = store.is_locked_by_other()
    if server:
        await asyncio.sleep(SERVER_FLUSH_WAIT)  # let `mta serve` write its in-memory counts
    db = None
    if cfg.cluster.database:
        from mta.cli_cluster import open_cluster
        from mta.cluster.tlsrpt import PgResultStore

        db = await open_cluster(cfg)  # the counts and claims of every node (issue 15)
        results: ResultStore = PgResultStore(db)
    else:
        results = ResultStore(cfg.tlsrpt.db_path)
    queued: list[str] = []

    def on_queued(meta: MessageMeta) -> None:
        queued.append(meta.id)
        if server:
            control.submit(store, "flush", meta.id)  # the running relay picks it up and delivers it

    try:
        if send:
            store.prepare()
        # The resolver of mta.app.build_resolver, without importing the delivery engine.
        resolver = Resolver(nameservers=cfg.dns.nameservers, port=cfg.dns.port, timeout=cfg.dns.timeout)
        sender = ReportSender(cfg, results, store, resolver, on_queued=on_queued)
        if not send:
            return _print_preview(day, await sender.preview(day), args.json)
        outcomes = await sender.send_day(day)
    finally:
        await results.close()
        if db is not None:
            await db.close()
    if args.json:
        print(json.dumps([o.to_json() for o in outcomes], indent=1))
    else:
        if not outcomes:
            print(f"{day}: no sessions recorded, nothing to send")
        for o in outcomes:
            print(f"{day} {o.domain}: {o.status}" + (f" ({o.detail})" if o.detail else ""))
        if queued and not server:
            print(f"{len(queued)} report mail(s) queued; they are delivered when `mta serve` runs")
    return 1 if any(o.status in ("failed", "error") for o in outcomes) else 0


def _print_preview(day: datetime.date, entries: list[dict[str, Any]], as_json: bool) -> int:
    if as_json:
        print(json.dumps({"day": day.isoformat(), "reports": entries}, indent=1, ensure_ascii=False))
        return 0
    if not entries:
        print(f"{day}: no sessions recorded")
    for e in entries:
        rua = ", ".join(e["rua"]) if e["rua"] else ("none" if e["rua"] is not None else "unknown")
        print(f"== {day} {e['domain']}  rua: {rua}")
        if e["sent"]:
            print(f"   already {e['sent']['status']}: {e['sent']['report_id']} {e['sent']['detail']}".rstrip())
        if e["error"]:
            print(f"   error: {e['error']}")
        if e["report"] is not None:
            print(json.dumps(e["report"], indent=1, ensure_ascii=False))
    return 0


def cmd_show(cfg: Config, args: argparse.Namespace) -> int:
    return asyncio.run(_run(cfg, args, send=False))


def cmd_send(cfg: Config, args: argparse.Namespace) -> int:
    return asyncio.run(_run(cfg, args, send=True))
