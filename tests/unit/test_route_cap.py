"""SMTP-11 host cap applied after the MTA-STS filter (issue 10 item 4): pure, exhaustive on small cases."""

from __future__ import annotations

import itertools

from mta.delivery.route import MAX_MX_HOSTS, cap_hosts
from mta.sts.decide import filter_mx
from mta.sts.policy import Policy


def hosts(n: int) -> list[str]:
    return [f"mx{i}.example.test" for i in range(1, n + 1)]


def test_issue10_item4_smtp_11_policy_listed_mx_below_the_cap_is_kept() -> None:
    """Issue 10 item 4: 12 MX hosts, only the 12th is in the enforce policy -> it is kept (and
    tried); the refused ones ahead of it are kept for reporting, at most MAX_MX_HOSTS of them."""
    policy = Policy("enforce", ("mx12.example.test",), 86400)
    kept = cap_hosts(filter_mx(policy, hosts(12)))
    assert [v.host for v in kept if v.allowed] == ["mx12.example.test"]
    assert len([v for v in kept if not v.allowed]) == MAX_MX_HOSTS


def test_smtp_11_without_policy_the_ten_most_preferred_are_kept() -> None:
    """SMTP-11: no policy (or testing) -> the first MAX_MX_HOSTS hosts, in order."""
    for policy in (None, Policy("testing", ("nomatch.test",), 86400)):
        kept = cap_hosts(filter_mx(policy, hosts(300)))
        assert [v.host for v in kept] == hosts(MAX_MX_HOSTS)


def test_smtp_11_cap_keeps_order_and_bounds_every_mix() -> None:
    """Every allowed/refused pattern of 14 hosts: order kept, <= limit allowed, <= limit refused,
    and no allowed host is dropped while fewer than `limit` allowed ones are kept."""
    limit = 3
    for mask in itertools.product((True, False), repeat=8):
        patterns = tuple(h for h, ok in zip(hosts(8), mask, strict=True) if ok)
        policy = Policy("enforce", patterns, 86400) if patterns else None
        verdicts = filter_mx(policy, hosts(8))
        kept = cap_hosts(verdicts, limit)
        assert kept == [v for v in verdicts if v in kept]  # a subsequence, same order
        allowed = [v for v in kept if v.allowed]
        assert len(allowed) == min(limit, len([v for v in verdicts if v.allowed]))
        assert allowed == [v for v in verdicts if v.allowed][:limit]
        assert len(kept) - len(allowed) <= limit
