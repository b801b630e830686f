"""route.order_mx and address literals, table by table (SMTP-8/9/10/12, NMX-1/3/4, STS-4)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from mta.delivery.route import Candidate, MxAnswer, address_literal_ip, is_address_literal, order_mx
from mta.errors import PermanentDeliveryError

ME = "relay.test"


def hosts(answer: MxAnswer, own: str = ME, seed: int = 1) -> list[str]:
    return [c.host for c in order_mx(answer, own, random.Random(seed))]


def test_smtp_9_sorted_by_preference_lowest_first() -> None:
    answer = MxAnswer("mx", ((30, "c.example.test"), (10, "a.example.test"), (20, "b.example.test")))
    assert order_mx(answer, ME, random.Random(0)) == [
        Candidate("a.example.test", 10), Candidate("b.example.test", 20), Candidate("c.example.test", 30)]


def test_smtp_9_host_names_normalised_and_duplicates_keep_best_preference() -> None:
    answer = MxAnswer("mx", ((20, "MX1.Example.Test."), (10, "mx1.example.test"), (15, "mx2.example.test")))
    assert order_mx(answer, ME, random.Random(0)) == [
        Candidate("mx1.example.test", 10), Candidate("mx2.example.test", 15)]


def test_smtp_10_equal_preferences_shuffled_by_rng() -> None:
    """Statistical (seeded): each of three equal MXes comes first in a fair share of 600 orderings."""
    answer = MxAnswer("mx", ((10, "a.test"), (10, "b.test"), (10, "c.test"), (20, "z.test")))
    rng = random.Random(8461)
    firsts: Counter[str] = Counter()
    for _ in range(600):
        order = [c.host for c in order_mx(answer, ME, rng)]
        assert sorted(order[:3]) == ["a.test", "b.test", "c.test"]
        assert order[3] == "z.test"  # randomness never crosses preference levels (SMTP-9)
        firsts[order[0]] += 1
    assert set(firsts) == {"a.test", "b.test", "c.test"}
    assert all(150 <= n <= 250 for n in firsts.values()), firsts


def test_smtp_10_order_depends_only_on_rng_not_record_order() -> None:
    one = MxAnswer("mx", ((10, "a.test"), (10, "b.test"), (10, "c.test")))
    two = MxAnswer("mx", ((10, "c.test"), (10, "a.test"), (10, "b.test")))
    for seed in range(20):
        assert hosts(one, seed=seed) == hosts(two, seed=seed)


@pytest.mark.parametrize(("records", "own", "expected"), [
    # own host at 20: drop 20 and everything above; keep better ones
    (((10, "a.test"), (20, "relay.test"), (30, "c.test")), "relay.test", ["a.test"]),
    # same, own hostname written differently (case, trailing dot)
    (((10, "a.test"), (20, "RELAY.test."), (20, "b.test")), "Relay.Test.", ["a.test"]),
    # own host not an MX: nothing dropped
    (((10, "a.test"), (20, "b.test")), "relay.test", ["a.test", "b.test"]),
    # a mere suffix match is not our name
    (((10, "a.test"), (20, "xrelay.test")), "relay.test", ["a.test", "xrelay.test"]),
    # listed twice: the best preference counts
    (((10, "a.test"), (20, "relay.test"), (40, "relay.test"), (30, "c.test")), "relay.test", ["a.test"]),
])
def test_smtp_12_own_hostname_drops_its_level_and_higher(records: tuple[tuple[int, str], ...], own: str,
                                                         expected: list[str]) -> None:
    assert hosts(MxAnswer("mx", records), own) == expected


@pytest.mark.parametrize("records", [
    ((10, "relay.test"), (20, "b.test")),
    ((10, "relay.test"), (10, "a.test")),  # an equal-preference peer is dropped too
    ((5, "relay.test"),),
])
def test_smtp_12_best_mx_is_myself_bounces_5_4_6(records: tuple[tuple[int, str], ...]) -> None:
    with pytest.raises(PermanentDeliveryError) as info:
        order_mx(MxAnswer("mx", records), ME, random.Random(0))
    assert info.value.reply.code == 550
    assert info.value.reply.enhanced == "5.4.6"
    assert "loops back to myself" in info.value.reply.text


def test_smtp_12_implicit_mx_naming_myself_bounces() -> None:
    with pytest.raises(PermanentDeliveryError) as info:
        order_mx(MxAnswer("implicit", ((0, "relay.test"),)), ME, random.Random(0))
    assert info.value.reply.enhanced == "5.4.6"


def test_smtp_4_implicit_mx_is_the_domain_itself() -> None:
    assert order_mx(MxAnswer("implicit", ((0, "example.test"),)), ME, random.Random(0)) == [
        Candidate("example.test", 0)]


def test_smtp_8_ip_literal_exchanges_are_dropped() -> None:
    answer = MxAnswer("mx", ((5, "192.0.2.1"), (10, "mx.example.test"), (10, "2001:db8::1")))
    assert hosts(answer) == ["mx.example.test"]


def test_smtp_8_only_ip_literal_exchanges_bounce_5_4_4() -> None:
    with pytest.raises(PermanentDeliveryError) as info:
        order_mx(MxAnswer("mx", ((10, "192.0.2.1"), (20, "2001:db8::1"))), ME, random.Random(0))
    assert (info.value.reply.code, info.value.reply.enhanced) == (550, "5.4.4")


@pytest.mark.parametrize("records", [((0, "."),), ((10, "."),), ((0, "."), (5, "."))])
def test_nmx_1_null_mx_bounces_556_5_1_10(records: tuple[tuple[int, str], ...]) -> None:
    """NMX-1 (and NMX-4: any preference): immediate permanent failure, no candidates."""
    with pytest.raises(PermanentDeliveryError) as info:
        order_mx(MxAnswer("null", records), ME, random.Random(0))
    assert (info.value.reply.code, info.value.reply.enhanced) == (556, "5.1.10")
    assert "null MX" in info.value.reply.text


def test_nmx_3_stray_root_record_among_real_ones_is_ignored() -> None:
    assert hosts(MxAnswer("mx", ((0, "."), (10, "mx.example.test")))) == ["mx.example.test"]


@pytest.mark.parametrize(("domain", "ip"), [
    ("[192.0.2.1]", "192.0.2.1"),
    ("[IPv6:2001:db8::1]", "2001:db8::1"),
    ("[ipv6:2001:DB8:0:0:0:0:0:1]", "2001:db8::1"),
    ("[IPv6:::ffff:192.0.2.1]", "::ffff:c000:201"),
    ("example.test", None),
    ("[example.test]", None),
    ("[2001:db8::1]", None),  # IPv6 needs the tag (RFC 5321 §4.1.3)
    ("[IPv6:192.0.2.1]", None),
    ("[192.0.2.256]", None),
    ("[192.0.2.01]", None),  # leading zeros are ambiguous (octal?): not a literal
    ("[IPv6:fe80::1%eth0]", None),
    ("[]", None),
    ("192.0.2.1", None),
    ("[192.0.2.1", None),
])
def test_sts_4_address_literals(domain: str, ip: str | None) -> None:
    assert address_literal_ip(domain) == ip
    assert is_address_literal(domain) is (ip is not None)
