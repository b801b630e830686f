"""`mta policy`: live MTA-STS discovery for operators, a probe of the MX hosts, and the cache listing.

    mta policy DOMAIN [--json]        TXT + HTTPS fetch through the configured resolver and CA
    mta policy DOMAIN --probe         ... and, for each MX: matches the policy? STARTTLS? TLS? cert valid?
                                      DNSSEC status, TLSA records, DANE match, governing policy
    mta policy --cache [--json]       the persistent policy cache

Exit 0 even when a domain has no policy (then mode, mx and max_age are null and error says why).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import random
from typing import Any

from mta.config import Config
from mta.errors import DeliveryError, DnsError, MtaError, StsError


def add_policy_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("policy", parents=[common], help="discover and check a domain's MTA-STS policy")
    p.add_argument("domain", nargs="?")
    p.add_argument("--json", action="store_true")
    p.add_argument("--probe", action="store_true", help="also check every MX host")
    p.add_argument("--cache", action="store_true", help="list the cached policies")
    p.set_defaults(func=cmd_policy)


async def discover(cfg: Config, domain: str) -> dict[str, Any]:
    """Live discovery, never the cache: {domain, txt_id, mode, mx, max_age, error, dialect}."""
    from mta.app import build_resolver
    from mta.net.dns import to_ascii
    from mta.sts import draft03
    from mta.sts.fetch import fetch_policy
    from mta.sts.policy import select_txt_record

    resolver = build_resolver(cfg)
    ascii_domain = to_ascii(domain)
    out: dict[str, Any] = {"domain": ascii_domain, "txt_id": None, "mode": None, "mx": None, "max_age": None,
                           "error": None, "dialect": None}
    dialect = "rfc8461"
    try:
        texts = await resolver.txt(f"_mta-sts.{ascii_domain}")
        try:
            record = select_txt_record(texts)
        except StsError as rfc_error:
            if not cfg.mta_sts.draft03_compat:
                raise
            # SEED-S2: the draft-03 record only when the RFC one yields nothing usable.
            try:
                record = draft03.select_draft_txt(await resolver.txt(f"mta-sts.{ascii_domain}"))
            except StsError:
                raise rfc_error from None
            dialect = "draft03"
        out["txt_id"] = record.id
        policy, _text = await fetch_policy(ascii_domain, https_port=cfg.mta_sts.https_port, resolver=resolver,
                                           ca_file=cfg.tls.ca_file or None, timeout=cfg.mta_sts.fetch_timeout,
                                           dialect=dialect)
    except (StsError, DnsError) as exc:
        out["error"] = str(exc) or type(exc).__name__
        if isinstance(exc, StsError):
            out["result_type"] = exc.result_type
        return out
    out.update(mode=policy.mode, mx=list(policy.mx), max_age=policy.max_age, dialect=policy.dialect)
    return out


async def probe(cfg: Config, info: dict[str, Any]) -> list[dict[str, Any]]:
    """Connect to every MX (opportunistic TLS) and tell what an enforce policy and DANE would think of it."""
    from mta.app import build_resolver, build_timeouts
    from mta.dane import lookup as dane_lookup
    from mta.dane.verify import verify_chain as dane_verify_chain
    from mta.delivery.route import order_mx
    from mta.delivery.smtp_client import SmtpSession, TlsMode
    from mta.delivery.transport import combine
    from mta.sts.decide import filter_mx
    from mta.sts.policy import Policy, mx_matches

    resolver = build_resolver(cfg)
    rows: list[dict[str, Any]] = []
    policy = Policy(mode=info["mode"], mx=tuple(info["mx"] or ()), max_age=info["max_age"] or 0) \
        if info.get("mode") else None
    try:
        answer = await resolver.mx(info["domain"])
        candidates = order_mx(answer, cfg.hostname, random.Random())
    except (DnsError, DeliveryError) as exc:
        return [{"mx": None, "error": str(exc)}]
    for cand in candidates:
        row: dict[str, Any] = {"mx": cand.host, "preference": cand.preference,
                               "matches_policy": None if info["mx"] is None
                               else any(mx_matches(cand.host, p) for p in info["mx"]),
                               "address": None, "starttls": None, "tls_version": None, "cert_valid": None,
                               "dnssec": {"mx": "secure" if answer.secure else "insecure", "address": None},
                               "dane": None, "tlsa": [], "tlsa_match": None, "policy": None, "error": None}
        try:
            found = await resolver.address_answer(cand.host, ipv6=cfg.delivery.ipv6)
            if not found.addresses:
                raise DnsError("no address")
            row["dnssec"]["address"] = "secure" if found.secure else "insecure"
            dane = await dane_lookup.host_verdict(resolver, cand.host, cfg.delivery.smtp_port,
                                                  enabled=cfg.dane.enabled and cfg.dns.dnssec,
                                                  mx_secure=answer.secure, addresses=found)
            verdict = combine(cand.host, filter_mx(policy, [cand.host])[0], policy, dane)
            row.update(dane=dane.kind if dane.applies else f"none ({dane.reason})", tlsa=list(dane.policy_strings),
                       policy=verdict.governed_by)
            row["address"] = found.addresses[0]
            session = await SmtpSession.open(address=found.addresses[0], port=cfg.delivery.smtp_port,
                                             mx_host=cand.host, helo_name=cfg.hostname, tls_mode=TlsMode.MAY,
                                             ca_file=cfg.tls.ca_file or None, timeouts=build_timeouts(cfg),
                                             sni=verdict.sni)
            row["starttls"] = session.starttls_offered
            row["tls_version"] = session.tls.version if session.tls else None
            row["cert_valid"] = bool(session.tls and session.tls.verified)
            if dane.records and session.peer_chain:
                check = dane_verify_chain(dane.records, session.peer_chain, dane.names,
                                          datetime.datetime.now(datetime.UTC))
                row["tlsa_match"] = check.ok
                if not check.ok:
                    row["error"] = f"{check.result_type}: {check.reason}"
            if session.tls and session.tls.error and not row["error"]:
                row["error"] = session.tls.error
            await session.close()
        except (MtaError, OSError) as exc:
            row["error"] = str(exc)
        rows.append(row)
    return rows


async def cached(cfg: Config) -> list[dict[str, Any]]:
    from mta.sts.cache import PolicyCache

    cache = PolicyCache(cfg.mta_sts.cache_path)
    try:
        entries = await cache.all()
    finally:
        await cache.close()

    def iso(ts: float) -> str:
        return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    return [{"domain": e.domain, "txt_id": e.txt_id, "mode": e.policy.mode, "mx": list(e.policy.mx),
             "max_age": e.policy.max_age, "dialect": e.policy.dialect, "fetched_at": iso(e.fetched_at),
             "expires_at": iso(e.expires_at)} for e in entries]


def cmd_policy(cfg: Config, args: argparse.Namespace) -> int:
    if args.cache:
        rows = asyncio.run(cached(cfg))
        if args.json:
            print(json.dumps(rows, indent=1))
        else:
            for r in rows:
                print(f"{r['domain']:<30} {r['mode']:<8} id={r['txt_id']} expires={r['expires_at']} "
                      f"mx={','.join(r['mx'])}")
        return 0
    if not args.domain:
        print("mta policy: give a DOMAIN or --cache")
        return 2
    info = asyncio.run(discover(cfg, args.domain))
    if args.probe:
        info["probe"] = asyncio.run(probe(cfg, info))
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"domain:  {info['domain']}\ntxt_id:  {info['txt_id']}\nmode:    {info['mode']}\n"
          f"mx:      {', '.join(info['mx'] or [])}\nmax_age: {info['max_age']}")
    if info["error"]:
        print(f"error:   {info['error']}")
    for row in info.get("probe", []):
        dnssec = row.get("dnssec") or {}
        print(f"  MX {row['mx']} [{row.get('address')}]: matches={row.get('matches_policy')} "
              f"starttls={row.get('starttls')} tls={row.get('tls_version')} cert_valid={row.get('cert_valid')} "
              f"dnssec=mx:{dnssec.get('mx')},address:{dnssec.get('address')} dane={row.get('dane')} "
              f"tlsa_match={row.get('tlsa_match')} policy={row.get('policy')}"
              + (f" error={row['error']}" if row.get("error") else ""))
        for record in row.get("tlsa") or []:
            print(f"    TLSA {record}")
    return 0
