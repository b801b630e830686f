"""One delivery attempt for the recipients of one message in one domain.

Order of work (cf. maddy's PrepareDomain/CheckMX/CheckConn):
1. MX lookup and MTA-STS policy lookup run together (the policy id is re-queried on every
   attempt, STS-83, so a retry always sees a newly published policy).
2. The MX list is ordered (route.order_mx) and judged by the policy (decide.filter_mx) BEFORE
   any connection: under `enforce` a host outside the `mx` patterns is never dialled (STS-74).
3. Each candidate is tried in order, each address in turn (SMTP-11): under `enforce` STARTTLS
   with a certificate valid for the MX host name and TLS >= 1.2 is required and a failing host
   is treated like an unreachable one (STS-86); nothing is ever sent in plaintext (STS-76).
4. If no candidate took the mail, every recipient is deferred; a policy failure is temporary
   (4.7.5), never a bounce by itself (STS-81). Permanent outcomes come only from 5xx replies,
   NXDOMAIN (5.1.2), null MX (5.1.10) and MX hosts that all have no address (5.4.4, SMTP-6).
"""

from __future__ import annotations

import asyncio
import datetime
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from mta import log, metrics
from mta.dane import lookup as dane_lookup
from mta.dane import verify as dane_verify
from mta.dane.decide import DaneVerdict
from mta.delivery.pool import ConnectionPool
from mta.delivery.route import Candidate, MxAnswer, address_literal_ip, cap_hosts, is_address_literal, order_mx
from mta.delivery.smtp_client import BindAddresses, SmtpSession, Timeouts, TlsMode, TlsRequiredError
from mta.delivery.transport import (
    DANE,
    MTA_STS,
    NONE,
    PKIX,
    REQUIRE,
    TLSA,
    HostVerdict,
    PolicyResult,
    combine,
    failure_results,
    judge_session,
    refusal_results,
    session_results,
)
from mta.delivery.unreachable import UnreachableHosts
from mta.errors import (
    DeliveryError,
    DnsError,
    DnsPermanentError,
    HostUnreachableError,
    PermanentDeliveryError,
    TransientDeliveryError,
)
from mta.model import SmtpReply, TlsInfo
from mta.net.dns import Resolver
from mta.net.tls import verify_chain
from mta.spool.state import DELIVERED_OUTCOME, PERMANENT, TRANSIENT, Outcome
from mta.sts.decide import MxVerdict, filter_mx
from mta.sts.policy import Policy


class SessionRecorder(Protocol):
    """Receives one call per delivery session for TLS reporting (RFC 8460)."""

    def record(self, *, policy_domain: str, policy: Policy | None, success: bool, result_type: str | None,
               mx_host: str | None, receiving_ip: str | None, reason: str = "",
               sending_ip: str | None = None, tlsa: Sequence[str] | None = None) -> None: ...


class NullRecorder:
    def record(self, **kwargs: Any) -> None:
        return None


@dataclass
class AttemptContext:
    """Everything an attempt needs; built once by the app."""

    hostname: str
    resolver: Resolver
    pool: ConnectionPool
    timeouts: Timeouts
    smtp_port: int = 25
    ipv6: bool = True
    ca_file: str | None = None
    sts: Any = None  # mta.sts.service.StsService or None when MTA-STS is disabled
    recorder: SessionRecorder = field(default_factory=NullRecorder)
    relayhost: tuple[str, int] | None = None
    relayhost_tls: str = "verify"
    relayhost_auth: tuple[str, str] | None = None
    rng: random.Random = field(default_factory=random.Random)
    bind: BindAddresses = field(default_factory=BindAddresses)  # delivery.bind_address(6)
    unreachable: UnreachableHosts | None = None  # SMTP-37: shared by every attempt of the process
    clock: Callable[[], float] = time.monotonic
    dane: bool = False  # [dane] enabled with [dns] dnssec: TLSA lookups below secure MX RRsets


@dataclass
class _Attempt:
    """Mutable bookkeeping of one attempt: what went wrong where, for the final reason."""

    policy: Policy | None = None
    policy_domain: str = ""
    sts_note: str = ""
    errors: list[str] = field(default_factory=list)
    policy_errors: list[str] = field(default_factory=list)
    discovery_failure: Any = None  # StsError of a failed policy discovery, reported with each session
    any_transient: bool = False
    mx_secure: bool = False  # DANE-1: the MX RRset (or implicit-MX addresses) validated
    dane_failed: bool = False  # a DANE host was unusable or failed: defer naming DANE (DANE-7)
    governed: str = ""  # the policy that governed the last host tried (log field "policy")

    @property
    def mode(self) -> str | None:
        return self.policy.mode if self.policy else None


def _all(rcpts: Sequence[str], kind: str, reply: SmtpReply, att: _Attempt, remote: str | None = None,
         reason: str = "") -> dict[str, Outcome]:
    policy = DANE if att.dane_failed else att.governed or (MTA_STS if att.mode in ("enforce", "testing") else NONE)
    return {r: Outcome(kind, reply, remote_mta=remote, sts_mode=att.mode, reason=reason or att.sts_note,
                       policy=policy) for r in rcpts}


async def _lookup_policy(ctx: AttemptContext, domain: str, att: _Attempt) -> None:
    if ctx.sts is None:
        return
    result = await ctx.sts.get_policy(domain)
    metrics.sts_lookup(result.source, failed=result.failure is not None or result.reason.startswith("txt-dns-error"))
    att.policy_domain = domain
    if result.source == "override":
        # Operators must see every delivery where their override replaced the published policy.
        log.event("policy", domain=domain, sts_mode=result.policy.mode if result.policy else "none",
                  reason="operator override from [mta_sts.overrides]")
    # STS-91: a discovery failure is reportable (fetch error / invalid / webpki). RFC 8460 counts
    # sessions, so it is not a session of its own: each session of this attempt carries it (issue
    # 10 item 12), also when several deliveries share one lookup (STS-88).
    att.discovery_failure = result.failure
    if result.policy is not None and result.policy.mode != "none":
        att.policy = result.policy
        att.sts_note = f"MTA-STS policy of {domain} ({result.policy.mode}, id {result.txt_id}, {result.source})"
    elif result.reason:
        att.sts_note = f"MTA-STS: {result.reason}"


async def deliver_domain(ctx: AttemptContext, domain: str, rcpts: Sequence[str], sender: str, data: bytes,
                         *, eight_bit: bool = False, smtputf8: bool = False, apply_sts: bool = True,
                         ) -> dict[str, Outcome]:
    """Try to deliver `data` to `rcpts` (all in `domain`); returns an Outcome per recipient.

    `apply_sts=False` is for TLS reports themselves (RPT-19: they are delivered even when the
    report domain's policy cannot be satisfied).
    """
    att = _Attempt(policy_domain=domain)
    if not apply_sts:
        ctx = _without_sts(ctx)
    if ctx.relayhost:
        host, port = ctx.relayhost
        await _lookup_policy(ctx, host, att)  # STS-3: the smart host's name is the policy domain
        candidates = [Candidate(host=host, preference=0)]
    elif is_address_literal(domain):
        # STS-4: no policy for address literals; connect straight to the address.
        ip = address_literal_ip(domain) or domain
        return await _try_hosts(ctx, [(v, [ip]) for v in filter_mx(None, [domain])], rcpts, sender, data, att,
                                ctx.smtp_port, eight_bit, smtputf8, verify=False)
    else:
        port = ctx.smtp_port
        mx_task = asyncio.ensure_future(ctx.resolver.mx(domain))
        try:
            await _lookup_policy(ctx, domain, att)
        finally:
            answer_or_exc: MxAnswer | BaseException
            try:
                answer_or_exc = await mx_task
            except DnsError as exc:
                answer_or_exc = exc
        if isinstance(answer_or_exc, DnsPermanentError):
            return _all(rcpts, PERMANENT, SmtpReply(550, f"{domain}: {answer_or_exc}", "5.1.2"), att)
        if isinstance(answer_or_exc, BaseException):
            # SMTP-3 / STS-89: temporary MX lookup failure defers, whatever the policy says.
            return _all(rcpts, TRANSIENT, SmtpReply(451, f"{domain}: {answer_or_exc}", "4.4.3"), att)
        try:
            candidates = order_mx(answer_or_exc, ctx.hostname, ctx.rng)
        except PermanentDeliveryError as exc:
            return _all(rcpts, PERMANENT, exc.reply, att)
        att.mx_secure = answer_or_exc.secure  # DANE-1: TLSA only below a secure MX RRset
    plans: list[tuple[MxVerdict, list[str] | None]] = [
        (v, None) for v in cap_hosts(filter_mx(att.policy, [c.host for c in candidates]))]  # filter, then cap (SMTP-11)
    verify = bool(ctx.relayhost) and ctx.relayhost_tls == "verify"
    return await _try_hosts(ctx, plans, rcpts, sender, data, att, port, eight_bit, smtputf8, verify=verify)


async def _try_hosts(ctx: AttemptContext, plans: list[tuple[MxVerdict, list[str] | None]], rcpts: Sequence[str],
                     sender: str, data: bytes, att: _Attempt, port: int, eight_bit: bool, smtputf8: bool,
                     *, verify: bool) -> dict[str, Outcome]:
    allowed: list[tuple[MxVerdict, list[str] | None]] = []
    for sts_verdict, addresses in plans:
        if sts_verdict.allowed:
            allowed.append((sts_verdict, addresses))
            continue
        # STS-74: never dialled; reported as validation-failure / sts-mx-mismatch (STS-92).
        _refuse(ctx, att, combine(sts_verdict.host, sts_verdict, att.policy, None))
    no_address_hosts = 0
    for sts_verdict, addresses in allowed:
        host = sts_verdict.host
        dane: DaneVerdict | None = None
        if addresses is None:
            try:
                answer = await ctx.resolver.address_answer(host, ipv6=ctx.ipv6)
            except DnsError as exc:
                att.errors.append(f"{host}: {exc}")
                att.any_transient = True
                continue
            addresses = answer.addresses
            if not addresses:
                no_address_hosts += 1
                att.errors.append(f"{host}: no address")
                continue
            if ctx.dane and not ctx.relayhost:
                dane = await dane_lookup.host_verdict(ctx.resolver, host, port, enabled=True,
                                                      mx_secure=att.mx_secure, addresses=answer)
        verdict = combine(host, sts_verdict, att.policy, dane, verify=verify)
        att.governed = verdict.governed_by
        if not verdict.allowed:
            _refuse(ctx, att, verdict)  # DANE-3: bogus TLSA -> this host is unusable
            continue
        for address in addresses:
            outcome = await _try_address(ctx, verdict, address, port, rcpts, sender, data, att, eight_bit, smtputf8)
            if outcome == "next-host":
                break
            if outcome is not None:
                return outcome
    if allowed and no_address_hosts == len(allowed) and not att.any_transient and not att.policy_errors:
        # SMTP-6 decision: every MX authoritatively without an address -> permanent 5.4.4.
        return _all(rcpts, PERMANENT, SmtpReply(550, "no MX host has an address", "5.4.4"), att)
    sts_enforce = att.policy is not None and att.policy.mode == "enforce"
    if att.dane_failed or (sts_enforce and (att.policy_errors or not allowed)):
        # STS-81, DANE-2/3/7: a policy failure defers (4.7.5), never bounces, never goes plaintext.
        reason = "; ".join(att.policy_errors + att.errors) or "no MX host matches the policy"
        notes = (["DANE (RFC 7672) validation failed"] if att.dane_failed else []) + (
            [att.sts_note] if sts_enforce else [])
        text = f"{'; '.join(notes)}: {reason}"
        return _all(rcpts, TRANSIENT, SmtpReply(451, text, "4.7.5"), att, reason=text)
    text = "; ".join(att.errors) or "no usable MX host"
    return _all(rcpts, TRANSIENT, SmtpReply(451, text, "4.4.1"), att)


def _record(ctx: AttemptContext, att: _Attempt, results: list[PolicyResult], host: str | None,
            address: str | None, sending_ip: str | None = None) -> None:
    """One TLS-RPT record per policy that applied (RFC 8460 §4.4)."""
    for r in results:
        extra: dict[str, Any] = {} if r.tlsa is None else {"tlsa": r.tlsa}
        if sending_ip is not None:
            extra["sending_ip"] = sending_ip
        ctx.recorder.record(policy_domain=att.policy_domain, policy=r.policy, success=r.success,
                            result_type=r.result_type, mx_host=host, receiving_ip=address, reason=r.reason, **extra)


def _with_discovery_failure(att: _Attempt, results: list[PolicyResult]) -> list[PolicyResult]:
    """STS-91: a failed policy discovery is carried by each session's MTA-STS record (issue 10 item 12)."""
    failure = att.discovery_failure
    if failure is None:
        return results
    marked = PolicyResult(None, None, False, failure.result_type, str(failure))
    sts = [r for r in results if r.tlsa is None]
    if not sts:
        return [*results, replace(marked, policy=att.policy)]
    return [replace(marked, policy=r.policy) if r.tlsa is None and r.success else r for r in results]


def _refuse(ctx: AttemptContext, att: _Attempt, verdict: HostVerdict) -> None:
    """A host that must not be dialled: remembered for the final reply and reported."""
    if verdict.governed_by == DANE:
        att.dane_failed = True
        att.policy_errors.append(f"MX {verdict.host}: {verdict.reason}")
    else:
        att.policy_errors.append(f"MX {verdict.host} is not allowed by the policy")
    _record(ctx, att, refusal_results(verdict), verdict.host, None)


def _without_sts(ctx: AttemptContext) -> AttemptContext:
    """RPT-19: report mails are delivered whatever MTA-STS or DANE would say (best-effort TLS)."""
    return replace(ctx, sts=None, dane=False)


async def _open(ctx: AttemptContext, host: str, address: str, port: int, mode: TlsMode,
                sni: str | None, pooled: bool = True) -> tuple[SmtpSession, bool]:
    """A pooled session for this destination, TLS mode and SNI, else a new one; and whether it is new."""
    session = await ctx.pool.get((host, address, port, (mode, sni))) if pooled else None
    if session is not None:
        return session, False
    session = await SmtpSession.open(address=address, port=port, mx_host=host, helo_name=ctx.hostname,
                                     tls_mode=mode, ca_file=ctx.ca_file, timeouts=ctx.timeouts, bind=ctx.bind,
                                     sni=sni)
    if ctx.relayhost_auth:
        await session.login(*ctx.relayhost_auth)
    return session, True


def _judged(ctx: AttemptContext, verdict: HostVerdict, session: SmtpSession) -> tuple[TlsInfo | None, TlsInfo | None]:
    """(the TLS facts as the verdict judges the certificate, the PKIX view when a report needs it)."""
    tls = session.tls
    if tls is None or tls.version is None:
        return tls, tls
    pkix: TlsInfo | None = None
    if verdict.pkix_view_needed:
        ok, error = verify_chain(session.peer_chain, ctx.ca_file, verdict.host)
        pkix = replace(tls, verified=ok, error=error)
    if verdict.cert == TLSA:  # DANE-5: the chain against the TLSA RRset
        check = dane_verify.verify_chain(verdict.tlsa, session.peer_chain, verdict.names,
                                         datetime.datetime.now(datetime.UTC))
        tls = replace(tls, verified=check.ok, error=None if check.ok else f"{check.result_type}: {check.reason}")
    elif verdict.cert == PKIX and verdict.tls == REQUIRE:  # DANE-4 beside a testing policy
        ok, error = verify_chain(session.peer_chain, ctx.ca_file, verdict.host)
        tls = replace(tls, verified=ok, error=error)
    return tls, pkix


async def _try_address(ctx: AttemptContext, verdict: HostVerdict, address: str, port: int,
                       rcpts: Sequence[str], sender: str, data: bytes, att: _Attempt,
                       eight_bit: bool, smtputf8: bool, pooled: bool = True) -> dict[str, Outcome] | str | None:
    """Outcomes when this address settled the recipients; "next-host" or None to go on.

    `pooled=False`: a new connection, never one from the pool."""
    host = verdict.host
    relay = f"{host}[{address}]:{port}"
    mode = TlsMode(verdict.tls)
    down = ctx.unreachable
    if down is not None and down.skipped((address, port), ctx.clock()):
        # SMTP-37: no connect timeout per message for a dead host; a deferral, never a bounce.
        wait = down.remaining((address, port), ctx.clock())
        att.errors.append(f"{relay}: skipped for {wait:.0f} s more, it refused or timed out recently")
        att.any_transient = True
        return None
    try:
        session, new = await _open(ctx, host, address, port, mode, verdict.sni, pooled)
    except TlsRequiredError as exc:
        att.policy_errors.append(f"{relay}: {exc.reply.text}")
        att.dane_failed = att.dane_failed or verdict.governed_by == DANE  # DANE-2: never plaintext
        _record(ctx, att, failure_results(verdict, exc.result_type, exc.reply.text), host, address,
                exc.local_address)
        return "next-host"
    except DeliveryError as exc:
        att.errors.append(f"{relay}: {exc.reply}")
        att.any_transient = True
        if down is not None and isinstance(exc, HostUnreachableError):
            down.mark((address, port), ctx.clock())
        return None
    if down is not None:
        down.forget((address, port))
    tls, pkix = _judged(ctx, verdict, session)
    if new:  # verified as the verdict judged it (PKIX, or TLSA under DANE)
        metrics.tls_session(tls.version if tls else None, bool(tls and tls.verified))
    judgement = judge_session(verdict, session.starttls_offered, tls)
    # One record per session and applied policy; sessions without a policy only with record_all_sessions.
    results = session_results(verdict, session.starttls_offered, tls, pkix)
    _record(ctx, att, _with_discovery_failure(att, results), host, address, session.local_address)
    if not judgement.ok:
        await ctx.pool.discard(session)
        att.policy_errors.append(f"{relay}: {judgement.reason}")
        att.dane_failed = att.dane_failed or verdict.governed_by == DANE  # DANE-7: no STS rescue
        return "next-host"
    try:
        result = await session.send(sender, list(rcpts), data, eight_bit=eight_bit, smtputf8=smtputf8)
    except TransientDeliveryError as exc:
        await ctx.pool.discard(session)
        if not new and session.lost_at_mail:
            # A pooled connection the server closed as we took it (pool rule): nothing of this
            # message was sent, so it goes out on a new connection, not to a retry minutes later.
            return await _try_address(ctx, verdict, address, port, rcpts, sender, data, att, eight_bit, smtputf8,
                                      pooled=False)
        att.errors.append(f"{relay}: {exc.reply}")
        att.any_transient = True
        return None
    await ctx.pool.put((host, address, port, (mode, verdict.sni)), session)
    tls_label = tls.version if tls else None
    verified = bool(tls and tls.verified)
    out: dict[str, Outcome] = {}
    for rcpt in rcpts:
        reply = result.replies.get(rcpt) or SmtpReply(451, "no reply for recipient", "4.4.2")
        # Only a 2yz is a delivery; anything odd is temporary, never "delivered" by accident.
        kind = DELIVERED_OUTCOME if 200 <= reply.code < 300 else PERMANENT if reply.code >= 500 else TRANSIENT
        out[rcpt] = Outcome(kind, reply, remote_mta=host, relay=relay, tls=tls_label, verified=verified,
                            sts_mode=att.mode, reason=att.sts_note, policy=verdict.governed_by)
    return out
