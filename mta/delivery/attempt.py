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
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from mta import log, metrics
from mta.delivery.pool import ConnectionPool
from mta.delivery.route import Candidate, MxAnswer, address_literal_ip, cap_hosts, is_address_literal, order_mx
from mta.delivery.smtp_client import BindAddresses, SmtpSession, Timeouts, TlsMode, TlsRequiredError
from mta.delivery.unreachable import UnreachableHosts
from mta.errors import (
    DeliveryError,
    DnsError,
    DnsPermanentError,
    HostUnreachableError,
    PermanentDeliveryError,
    TransientDeliveryError,
)
from mta.model import SmtpReply
from mta.net.dns import Resolver
from mta.spool.state import DELIVERED_OUTCOME, PERMANENT, TRANSIENT, Outcome
from mta.sts.decide import check_tls, filter_mx
from mta.sts.policy import Policy


class SessionRecorder(Protocol):
    """Receives one call per delivery session for TLS reporting (RFC 8460)."""

    def record(self, *, policy_domain: str, policy: Policy | None, success: bool, result_type: str | None,
               mx_host: str | None, receiving_ip: str | None, reason: str = "",
               sending_ip: str | None = None) -> None: ...


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


@dataclass
class _Attempt:
    """Mutable bookkeeping of one attempt: what went wrong where, for the final reason."""

    policy: Policy | None = None
    policy_domain: str = ""
    sts_note: str = ""
    errors: list[str] = field(default_factory=list)
    policy_errors: list[str] = field(default_factory=list)
    mx_mismatch: set[str] = field(default_factory=set)  # testing mode: hosts outside the policy (STS-84)
    discovery_failure: Any = None  # StsError of a failed policy discovery, reported with each session
    any_transient: bool = False

    @property
    def mode(self) -> str | None:
        return self.policy.mode if self.policy else None


def _all(rcpts: Sequence[str], kind: str, reply: SmtpReply, att: _Attempt, remote: str | None = None,
         reason: str = "") -> dict[str, Outcome]:
    return {r: Outcome(kind, reply, remote_mta=remote, sts_mode=att.mode, reason=reason or att.sts_note)
            for r in rcpts}


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
        return await _try_hosts(ctx, [(domain, [ip], False)], rcpts, sender, data, att, ctx.smtp_port,
                                eight_bit, smtputf8, tls=TlsMode.MAY)
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
    verdicts = cap_hosts(filter_mx(att.policy, [c.host for c in candidates]))  # filter, then cap (SMTP-11)
    hosts: list[tuple[str, list[str] | None, bool]] = []
    for v in verdicts:
        if not v.allowed:
            # STS-74: never dialled; reported as validation-failure / sts-mx-mismatch (STS-92).
            att.policy_errors.append(f"MX {v.host} is not allowed by the policy")
            ctx.recorder.record(policy_domain=att.policy_domain, policy=att.policy, success=False,
                                result_type="validation-failure", mx_host=v.host, receiving_ip=None,
                                reason=v.reason or "sts-mx-mismatch")
            continue
        if v.reason:
            att.mx_mismatch.add(v.host)
        hosts.append((v.host, None, v.require_tls))
    tls = TlsMode.MAY
    if ctx.relayhost and ctx.relayhost_tls == "verify":
        tls = TlsMode.VERIFY
    return await _try_hosts(ctx, hosts, rcpts, sender, data, att, port, eight_bit, smtputf8, tls=tls)


async def _try_hosts(ctx: AttemptContext, hosts: list[tuple[str, list[str] | None, bool]], rcpts: Sequence[str],
                     sender: str, data: bytes, att: _Attempt, port: int, eight_bit: bool, smtputf8: bool,
                     *, tls: TlsMode) -> dict[str, Outcome]:
    no_address_hosts = 0
    for host, addresses, require_tls in hosts:
        if addresses is None:
            try:
                addresses = await ctx.resolver.addresses(host, ipv6=ctx.ipv6)
            except DnsError as exc:
                att.errors.append(f"{host}: {exc}")
                att.any_transient = True
                continue
            if not addresses:
                no_address_hosts += 1
                att.errors.append(f"{host}: no address")
                continue
        mode = TlsMode.VERIFY if require_tls else tls
        for address in addresses:
            outcome = await _try_address(ctx, host, address, port, mode, rcpts, sender, data, att,
                                         eight_bit, smtputf8)
            if outcome == "next-host":
                break
            if outcome is not None:
                return outcome
    if hosts and no_address_hosts == len(hosts) and not att.any_transient and not att.policy_errors:
        # SMTP-6 decision: every MX authoritatively without an address -> permanent 5.4.4.
        return _all(rcpts, PERMANENT, SmtpReply(550, "no MX host has an address", "5.4.4"), att)
    if att.policy is not None and att.policy.mode == "enforce" and (att.policy_errors or not hosts):
        reason = "; ".join(att.policy_errors + att.errors) or "no MX host matches the policy"
        text = f"{att.sts_note}: {reason}"
        return _all(rcpts, TRANSIENT, SmtpReply(451, text, "4.7.5"), att, reason=text)
    text = "; ".join(att.errors) or "no usable MX host"
    return _all(rcpts, TRANSIENT, SmtpReply(451, text, "4.4.1"), att)


def _without_sts(ctx: AttemptContext) -> AttemptContext:
    from dataclasses import replace

    return replace(ctx, sts=None)


async def _open(ctx: AttemptContext, host: str, address: str, port: int, mode: TlsMode) -> SmtpSession:
    """A pooled session for this destination and TLS mode, else a new one."""
    session = await ctx.pool.get((host, address, port, mode))
    if session is not None:
        return session
    session = await SmtpSession.open(address=address, port=port, mx_host=host, helo_name=ctx.hostname,
                                     tls_mode=mode, ca_file=ctx.ca_file, timeouts=ctx.timeouts, bind=ctx.bind)
    metrics.tls_session(session.tls.version if session.tls else None, bool(session.tls and session.tls.verified))
    if ctx.relayhost_auth:
        await session.login(*ctx.relayhost_auth)
    return session


async def _try_address(ctx: AttemptContext, host: str, address: str, port: int, mode: TlsMode,
                       rcpts: Sequence[str], sender: str, data: bytes, att: _Attempt,
                       eight_bit: bool, smtputf8: bool) -> dict[str, Outcome] | str | None:
    """Outcomes when this address settled the recipients; "next-host" or None to go on."""
    relay = f"{host}[{address}]:{port}"
    down = ctx.unreachable
    if down is not None and down.skipped((address, port), ctx.clock()):
        # SMTP-37: no connect timeout per message for a dead host; a deferral, never a bounce.
        wait = down.remaining((address, port), ctx.clock())
        att.errors.append(f"{relay}: skipped for {wait:.0f} s more, it refused or timed out recently")
        att.any_transient = True
        return None
    try:
        session = await _open(ctx, host, address, port, mode)
    except TlsRequiredError as exc:
        att.policy_errors.append(f"{relay}: {exc.reply.text}")
        ctx.recorder.record(policy_domain=att.policy_domain, policy=att.policy, success=False,
                            result_type=exc.result_type, mx_host=host, receiving_ip=address, reason=exc.reply.text,
                            sending_ip=exc.local_address)
        return "next-host"
    except DeliveryError as exc:
        att.errors.append(f"{relay}: {exc.reply}")
        att.any_transient = True
        if down is not None and isinstance(exc, HostUnreachableError):
            down.mark((address, port), ctx.clock())
        return None
    if down is not None:
        down.forget((address, port))
    verdict = check_tls(att.policy, session.starttls_offered, session.tls)
    result_type, reason = verdict.result_type, verdict.reason
    if result_type is None and host in att.mx_mismatch:
        result_type, reason = "validation-failure", "sts-mx-mismatch"  # testing mode: delivered, but reported
    if result_type is None and att.discovery_failure is not None:
        result_type, reason = att.discovery_failure.result_type, str(att.discovery_failure)
    # One record per session; sessions without a policy are kept only with record_all_sessions.
    ctx.recorder.record(policy_domain=att.policy_domain, policy=att.policy, success=result_type is None,
                        result_type=result_type, mx_host=host, receiving_ip=address, reason=reason,
                        sending_ip=session.local_address)
    if not verdict.ok:
        await ctx.pool.discard(session)
        att.policy_errors.append(f"{relay}: {verdict.reason}")
        return "next-host"
    try:
        result = await session.send(sender, list(rcpts), data, eight_bit=eight_bit, smtputf8=smtputf8)
    except TransientDeliveryError as exc:
        await ctx.pool.discard(session)
        att.errors.append(f"{relay}: {exc.reply}")
        att.any_transient = True
        return None
    await ctx.pool.put((host, address, port, mode), session)
    tls_label = session.tls.version if session.tls else None
    verified = bool(session.tls and session.tls.verified)
    out: dict[str, Outcome] = {}
    for rcpt in rcpts:
        reply = result.replies.get(rcpt) or SmtpReply(451, "no reply for recipient", "4.4.2")
        # Only a 2yz is a delivery; anything odd is temporary, never "delivered" by accident.
        kind = DELIVERED_OUTCOME if 200 <= reply.code < 300 else PERMANENT if reply.code >= 500 else TRANSIENT
        out[rcpt] = Outcome(kind, reply, remote_mta=host, relay=relay, tls=tls_label, verified=verified,
                            sts_mode=att.mode, reason=att.sts_note)
    return out
