"""`mta policy`: live MTA-STS discovery for operators, a probe of the MX hosts, and the cache listing.

    mta policy DOMAIN [--json]        TXT + HTTPS fetch through the configured resolver and CA
    mta policy DOMAIN --probe         ... and, for each MX: matches the policy? STARTTLS? TLS? cert valid?
                                      DNSSEC status, TLSA records, DANE match, governing policy
    mta policy --cache [--json]       the persistent policy cache

Exit 0 even when a domain has no policy (then mode, mx and max_age are null and error says why).
A domain that publishes no MTA-STS record at all is not a failure: `policy_type` is
"no-policy-found" and `result_type` null (RFC 8460 reports nothing for it); `result_type` is set
only for what TLS-RPT would report (a failed or invalid policy fetch, STS-91). Text output shows
"none" for an absent value, never Python's None; JSON uses null (issue 11 §4).

`--cache` exits 1 when the cache file cannot be read or a row in it no longer parses (issue 10
item 3): such rows are listed with the reason, because their policy is not being applied.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import random
from typing import TYPE_CHECKING, Any

from mta.config import Config
from mta.errors import DeliveryError, DnsError, MtaError, StsError, StsRecordError

if TYPE_CHECKING:
    from mta.sts.decide import CacheEntry

NO_POLICY = "no-policy-found"  # RFC 8460 §4.4 policy-type for a domain without a policy


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
    from mta.sts.policy import is_sts_record, select_txt_record

    resolver = build_resolver(cfg)
    ascii_domain = to_ascii(domain)
    out: dict[str, Any] = {"domain": ascii_domain, "txt_id": None, "mode": None, "mx": None, "max_age": None,
                           "error": None, "dialect": None, "published": False, "policy_type": NO_POLICY,
                           "result_type": None}
    dialect = "rfc8461"
    try:
        texts = await resolver.txt(f"_mta-sts.{ascii_domain}")
        published = any(is_sts_record(t) for t in texts)
        try:
            record = select_txt_record(texts)
        except StsError as rfc_error:
            if not cfg.mta_sts.draft03_compat:
                raise
            # SEED-S2: the draft-03 record only when the RFC one yields nothing usable.
            draft_texts = await resolver.txt(f"mta-sts.{ascii_domain}")
            published = published or any(draft03.is_draft_record(t) for t in draft_texts)
            try:
                record = draft03.select_draft_txt(draft_texts)
            except StsError:
                raise rfc_error from None
            dialect = "draft03"
        out.update(txt_id=record.id, published=True)
        policy, _text = await fetch_policy(ascii_domain, https_port=cfg.mta_sts.https_port, resolver=resolver,
                                           ca_file=cfg.tls.ca_file or None, timeout=cfg.mta_sts.fetch_timeout,
                                           dialect=dialect)
    except StsRecordError as exc:
        # No record, or no usable one: the domain has no policy (STS-9/11/12); nothing to report.
        out["error"] = str(exc) if published else f"no MTA-STS record at _mta-sts.{ascii_domain}"
        out["published"] = published
        return out
    except (StsError, DnsError) as exc:
        out["error"] = str(exc) or type(exc).__name__
        if isinstance(exc, StsError):  # a record announced a policy we could not get: reported (STS-91)
            out.update(policy_type="sts", result_type=exc.result_type)
        return out
    out.update(mode=policy.mode, mx=list(policy.mx), max_age=policy.max_age, dialect=policy.dialect,
               policy_type="sts")
    return out


async def probe(cfg: Config, info: dict[str, Any]) -> list[dict[str, Any]]:
    """Connect to every MX (opportunistic TLS) and tell what an enforce policy and DANE would think of it."""
    from mta.app import build_resolver, build_timeouts
    from mta.dane import lookup as dane_lookup
    from mta.dane.verify import verify_chain as dane_verify_chain
    from mta.delivery.route import MAX_MX_HOSTS, order_mx
    from mta.delivery.smtp_client import BindAddresses, SmtpSession, TlsMode
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

    def matches(host: str) -> bool | None:
        return None if info["mx"] is None else any(mx_matches(host, p) for p in info["mx"])

    # The hosts delivery would consider: the most preferred ones, and policy-listed ones further
    # down (the cap comes after the policy filter, issue 10 item 4); bounded either way.
    candidates = candidates[:MAX_MX_HOSTS] + [c for c in candidates[MAX_MX_HOSTS:] if matches(c.host)][:MAX_MX_HOSTS]
    for cand in candidates:
        row: dict[str, Any] = {"mx": cand.host, "preference": cand.preference,
                               "matches_policy": matches(cand.host),
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
                                             sni=verdict.sni,
                                             # the probe leaves from where deliveries leave (CFG-2)
                                             bind=BindAddresses(cfg.delivery.bind_address, cfg.delivery.bind_address6))
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


async def _cluster_cached(cfg: Config) -> tuple[list[CacheEntry], dict[str, str], str | None]:
    """The policy cache shared by a cluster's nodes (issue 15): entries, damaged rows, or an error."""
    from mta.cli_cluster import open_cluster
    from mta.cluster.policies import PgPolicyCache

    try:
        db = await open_cluster(cfg)
    except MtaError as exc:
        return [], {}, str(exc)
    try:
        cache = PgPolicyCache(db)
        await cache.load()
        return await cache.all(), cache.damaged(), None
    except MtaError as exc:
        return [], {}, str(exc)
    finally:
        await db.close()


async def cached(cfg: Config) -> tuple[list[dict[str, Any]], bool]:
    """(rows, healthy): one row per cached policy, plus one per damaged row (issue 10 item 3).

    A damaged row has only `domain` and `error` set; an unreadable file gives one row whose
    `domain` is null. `healthy` is False in both cases.
    """
    from mta.sts.cache import CacheError, PolicyCache

    empty = {"txt_id": None, "mode": None, "mx": None, "max_age": None, "dialect": None, "fetched_at": None,
             "expires_at": None}
    if cfg.cluster.database:
        entries, damaged, error = await _cluster_cached(cfg)
        if error is not None:
            return [{"domain": None, **empty, "error": f"{error}; no cached policy can be read"}], False
    else:
        cache = PolicyCache(cfg.mta_sts.cache_path)
        try:
            entries = await cache.all()
            damaged = cache.damaged()
        except CacheError as exc:
            return [{"domain": None, **empty, "error": f"{exc}; no cached policy can be applied"}], False
        finally:
            await cache.close()

    def iso(ts: float) -> str:
        return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    rows = [{"domain": e.domain, "txt_id": e.txt_id, "mode": e.policy.mode, "mx": list(e.policy.mx),
             "max_age": e.policy.max_age, "dialect": e.policy.dialect, "fetched_at": iso(e.fetched_at),
             "expires_at": iso(e.expires_at), "error": None} for e in entries]
    rows += [{"domain": d, **empty, "error": f"stored policy is unreadable and not applied: {why}"}
             for d, why in sorted(damaged.items())]
    return rows, not damaged


def _show(value: Any) -> str:
    """A value for the text output: never Python's None/True/False (issue 11 §4)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _print_cache(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        if r["error"]:
            print(f"{_show(r['domain']):<30} ERROR    {r['error']}")
            continue
        print(f"{r['domain']:<30} {r['mode']:<8} id={r['txt_id']} expires={r['expires_at']} "
              f"mx={','.join(r['mx'])}")


def _print_info(info: dict[str, Any]) -> None:
    print(f"domain:  {info['domain']}\ntxt_id:  {_show(info['txt_id'])}\nmode:    {_show(info['mode'])}\n"
          f"mx:      {', '.join(info['mx'] or []) or 'none'}\nmax_age: {_show(info['max_age'])}")
    if info["policy_type"] == NO_POLICY and not info["published"]:
        print(f"policy:  none published ({info['error']})")
    elif info["error"]:
        print(f"error:   {info['error']}" + (f" ({info['result_type']})" if info["result_type"] else ""))
    for row in info.get("probe", []):
        if row["mx"] is None:
            print(f"  MX lookup failed: {row['error']}")
            continue
        where = f" [{row['address']}]" if row.get("address") else ""
        print(f"  MX {row['mx']}{where}: matches={_show(row.get('matches_policy'))} "
              f"starttls={_show(row.get('starttls'))} tls={_show(row.get('tls_version'))} "
              f"cert_valid={_show(row.get('cert_valid'))}" + _dane_text(row)
              + (f" error={row['error']}" if row.get("error") else ""))
        for record in row.get("tlsa") or []:
            print(f"    TLSA {record}")


def _dane_text(row: dict[str, Any]) -> str:
    """The DANE part of a probe line: DNSSEC status, DANE verdict, TLSA match, governing policy."""
    dnssec = row.get("dnssec") or {}
    return (f" dnssec=mx:{_show(dnssec.get('mx'))},address:{_show(dnssec.get('address'))} "
            f"dane={_show(row.get('dane'))} tlsa_match={_show(row.get('tlsa_match'))} "
            f"policy={_show(row.get('policy'))}")


def cmd_policy(cfg: Config, args: argparse.Namespace) -> int:
    if args.cache:
        rows, healthy = asyncio.run(cached(cfg))
        if args.json:
            print(json.dumps(rows, indent=1))
        else:
            _print_cache(rows)
        return 0 if healthy else 1
    if not args.domain:
        print("mta policy: give a DOMAIN or --cache")
        return 2
    info = asyncio.run(discover(cfg, args.domain))
    if args.probe:
        info["probe"] = asyncio.run(probe(cfg, info))
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    _print_info(info)
    return 0
