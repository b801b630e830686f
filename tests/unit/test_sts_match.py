"""MX host matching against `mx` patterns (checklist 1F and section 2, RFC 6125 rules)."""

from __future__ import annotations

import pytest

from mta.sts.policy import Policy, mx_matches

# --- 1F and section 2: MX pattern matching -------------------------------------------------

MATCHES = [
    ("STS-67", "mail.example.com", "mail.example.com", True),
    ("STS-67", "mail2.example.com", "mail.example.com", False),
    ("STS-67", "example.com", "mail.example.com", False),
    ("STS-67", "mail.example.com.evil.net", "mail.example.com", False),
    ("STS-68", "mx1.example.com", "*.example.com", True),
    ("STS-68", "example.com", "*.example.com", False),
    ("STS-68", "a.b.example.com", "*.example.com", False),
    ("STS-68", "mx1.example.com.evil.net", "*.example.com", False),
    ("STS-68", "mx1example.com", "*.example.com", False),
    ("STS-68", ".example.com", "*.example.com", False),
    ("STS-68", "mx1.notexample.com", "*.example.com", False),
    ("STS-69", "MX1.Example.COM", "*.example.com", True),
    ("STS-69", "mail.example.com", "Mail.Example.com", True),
    ("STS-69", "MAIL.EXAMPLE.COM", "mail.example.com", True),
    ("ID-1", "MX1.EXAMPLE.COM", "mx1.example.com", True),
    ("STS-70", "mx1.example.com.", "*.example.com", True),
    ("STS-70", "mail.example.com.", "mail.example.com", True),
    ("STS-70", "mail.example.com", "mail.example.com.", True),
    ("STS-70", "mx1.example.com.", "*.example.com.", True),
    ("STS-70", "mail.example.com..", "mail.example.com", False),
    ("STS-72", "*.example.com", "*.example.com", False),
    ("STS-72", "*.example.com", "mail.example.com", False),
    ("STS-72", "*", "*.example.com", False),
    ("STS-72", "mail.example.com", "*", False),
    ("ID-3", "example.com", "*.example.com", False),
    ("ID-4", "mx1.example.com", "mx*.example.com", False),
    ("ID-4", "mx1.example.com", "*x1.example.com", False),
    ("ID-4", "mx1.example.com", "mx1.*.com", False),
    ("ID-5", "xn--bcher-kva.example", "xn--*.example", False),
    ("ID-5", "xn--bcher-kva.example.com", "*.example.com", True),  # whole-label wildcard over an A-label
    ("ID-2", "bücher.example", "xn--bcher-kva.example", True),
    ("ID-2", "BÜCHER.example", "xn--bcher-kva.example", True),
    ("ID-2", "mx.bücher.example", "*.xn--bcher-kva.example", True),
    ("STS-51", "xn--bcher-kva.example", "bücher.example", False),
    ("ID-9", "example.com", "*.com", False),
    ("ID-9", "anything", "*", False),
    ("STS-50", "192.0.2.1", "192.0.2.1", True),  # grammatical; a real MX name never looks like this
    ("STS-73", "example.com", "example.com", True),
    ("STS-68", "", "*.example.com", False),
    ("STS-67", "", "", False),
    ("STS-67", "mail.example.com", "", False),
    ("STS-67", "mail..example.com", "mail..example.com", False),
    ("STS-67", "mail example.com", "mail example.com", False),
    ("STS-68", "a b.example.com", "*.example.com", False),
]


@pytest.mark.parametrize(("item", "host", "pattern", "expected"), MATCHES)
def test_sts_67_72_id_1_9_mx_matches(item: str, host: str, pattern: str, expected: bool) -> None:
    """STS-67..73, ID-1..5, ID-9: MX host name against one policy pattern."""
    assert mx_matches(host, pattern) is expected, item


def test_sts_71_any_pattern_is_enough() -> None:
    """STS-71: one matching pattern among several suffices."""
    policy = Policy("enforce", ("a.example.org", "*.example.net", "mail.example.com"), 60)
    assert policy.allows("mail.example.com")
    assert policy.allows("MX9.example.net.")
    assert not policy.allows("evil.example.org")
    assert not Policy("none", (), 60).allows("mail.example.com")
