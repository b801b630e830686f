"""`mta dkim`: make a signing key and check its DNS record.

    mta dkim keygen --domain D --selector S [--algorithm rsa-sha256|ed25519-sha256] [--bits 2048] --out FILE
        writes the private key (PEM, mode 0600, never over an existing file) and prints the
        record to publish: `S._domainkey.D. IN TXT "v=DKIM1; k=rsa; p=..."` (255-octet strings)
    mta dkim check [--domain D] [--selector S] [--json]
        resolves each configured key's record through the configured resolver and says whether it
        carries that key; exit 0 when every checked key is published, 1 otherwise. A missing or
        wrong record never stops mail: receivers just cannot verify it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

from mta.config import DKIM_ALGORITHMS, Config
from mta.dkim import keys
from mta.errors import DnsError


def add_dkim_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    d = sub.add_parser("dkim", help="DKIM keys: keygen, check").add_subparsers(dest="dkim_cmd", required=True)
    k = d.add_parser("keygen", help="make a signing key and print its DNS record")
    k.add_argument("--domain", required=True)
    k.add_argument("--selector", required=True)
    k.add_argument("--algorithm", choices=DKIM_ALGORITHMS, default="rsa-sha256")
    k.add_argument("--bits", type=int, default=2048, help="RSA key size (default 2048, at least 1024)")
    k.add_argument("--out", required=True, help="private key file to create (PEM, mode 0600)")
    k.set_defaults(func=None, raw=cmd_keygen)
    c = d.add_parser("check", parents=[common], help="check the published records of the configured keys")
    c.add_argument("--domain")
    c.add_argument("--selector")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_check)


def cmd_keygen(args: argparse.Namespace) -> int:
    try:
        private = keys.generate(args.algorithm, args.bits)
    except ValueError as exc:
        print(f"mta: {exc}", file=sys.stderr)
        return 2
    try:
        # O_EXCL: a typo must never replace a key whose record is already published.
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        print(f"mta: {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    with os.fdopen(fd, "wb") as fh:
        fh.write(keys.private_pem(private))
    print(keys.zone_line(args.domain, args.selector, keys.record_value(private)))
    return 0


async def _check(cfg: Config, selected: list[tuple[int, keys.LoadedKey]]) -> list[dict[str, Any]]:
    from mta.app import build_resolver

    resolver = build_resolver(cfg)
    out: list[dict[str, Any]] = []
    for i, key in selected:
        name = f"{key.selector}._domainkey.{key.domain}"
        row: dict[str, Any] = {"key": f"dkim.keys[{i}]", "name": name, "algorithm": key.algorithm, "ok": False}
        try:
            texts = await resolver.txt(name)
        except DnsError as exc:
            row["problem"] = f"lookup failed: {exc}"
            out.append(row)
            continue
        candidates = [t for t in texts if "p=" in t]
        if not candidates:
            row["problem"] = "no DKIM key record published"
        elif len(candidates) > 1:
            row["problem"] = f"{len(candidates)} key records published (receivers may pick any; keep one)"
        else:
            row["ok"], why = keys.record_matches(candidates[0], key)
            if why:
                row["problem"] = why
        out.append(row)
    return out


def cmd_check(cfg: Config, args: argparse.Namespace) -> int:
    loaded = keys.load_keys(cfg.dkim, cfg.source)
    selected = [(i, k) for i, k in enumerate(loaded)
                if (not args.domain or k.domain == args.domain.lower().rstrip("."))
                and (not args.selector or k.selector == args.selector)]
    if not selected:
        print("mta: no configured [[dkim.keys]] entry matches" if loaded else "mta: no [[dkim.keys]] configured",
              file=sys.stderr)
        return 1
    rows = asyncio.run(_check(cfg, selected))
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        for row in rows:
            verdict = "ok: the record carries this key" if row["ok"] else f"PROBLEM: {row['problem']}"
            print(f"{row['name']} ({row['key']}, {row['algorithm']}): {verdict}")
    return 0 if all(r["ok"] for r in rows) else 1
