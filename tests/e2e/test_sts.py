"""MTA-STS end to end (RFC 8461): a real `mta serve`, DNS, HTTPS policy hosts and MX hosts on loopback."""

from __future__ import annotations

import json
import time

import pytest

from tests.e2e.test_delivery import queue
from tests.support.relay import run_cli
from tests.support.world import World


def enforce_world(world: World, cert: str | None = "valid", patterns: list[str] | None = None,
                  mode: str = "enforce", **mx_behaviour: object) -> object:
    mx = world.mx_host("mx1.dst.test", "127.0.0.21", cert=cert, **mx_behaviour)
    world.domain("dst.test", [(10, "mx1.dst.test")])
    world.sts("dst.test", mode, patterns or ["mx1.dst.test"])
    return mx


@pytest.mark.req("STS-2", "STS-79")
def test_sts_1_55_enforce_valid_mx_delivered_and_cached(world: World) -> None:
    mx = enforce_world(world)
    relay = world.relay()
    qid = world.submit(relay, ["bob@dst.test"])
    [msg] = mx.wait_for_messages_blocking(1, timeout=10)  # type: ignore[attr-defined]
    assert msg.sni == "mx1.dst.test"  # STS-79
    [ev] = relay.wait_event("delivered", queue_id=qid)
    assert ev["sts_mode"] == "enforce" and ev["verified"] is True and ev["tls"] in ("TLSv1.2", "TLSv1.3")
    assert ("_mta-sts.dst.test", "TXT") in world.dns.queries  # STS-1
    assert ("_mta-sts.test", "TXT") not in world.dns.queries  # STS-2: never the parent
    [req] = world.policy.requests_for("mta-sts.dst.test")
    assert (req.sni, req.method, req.path) == ("mta-sts.dst.test", "GET", "/.well-known/mta-sts.txt")  # STS-25/26
    assert req.header("if-none-match") is None and req.header("if-modified-since") is None  # STS-32
    world.submit(relay, ["carol@dst.test"])
    mx.wait_for_messages_blocking(2, timeout=10)  # type: ignore[attr-defined]
    assert len(world.policy.requests_for("mta-sts.dst.test")) == 1  # STS-55: cached, no HTTPS


def test_sts_74_81_mx_not_in_policy_is_never_dialled_and_defers(world: World) -> None:
    mx = enforce_world(world, patterns=["mx.elsewhere.test"])
    relay = world.relay()
    qid = world.submit(relay, ["bob@dst.test"])
    [ev] = relay.wait_event("deferred", queue_id=qid)
    assert ev["sts_mode"] == "enforce" and ev["status"] == "4.7.5"
    assert "not allowed by the policy" in ev["reply"]
    assert mx.sessions == []  # type: ignore[attr-defined]
    [m] = queue(relay)
    assert m["recipients"][0]["status"] == "deferred" and "MTA-STS" in m["recipients"][0]["last_error"]
    assert m["recipients"][0]["sts_mode"] == "enforce"


@pytest.mark.parametrize("cert", ["wrong-name", "expired", "untrusted", "cn-only", None])
def test_sts_75_76_77_78_bad_tls_under_enforce_defers_without_mail_from(world: World, cert: str | None) -> None:
    mx = enforce_world(world, cert=cert)
    relay = world.relay()
    qid = world.submit(relay, ["bob@dst.test"])
    [ev] = relay.wait_event("deferred", queue_id=qid)
    assert ev["sts_mode"] == "enforce" and ev["status"] == "4.7.5"
    assert mx.messages == []  # type: ignore[attr-defined]
    assert not any(s.saw("MAIL") for s in mx.sessions)  # type: ignore[attr-defined]
    # STS-76: no plaintext retry on the same host
    assert all(s.saw("STARTTLS") for s in mx.sessions) or cert is None  # type: ignore[attr-defined]


def test_sts_84_testing_mode_delivers_despite_bad_cert(world: World) -> None:
    mx = enforce_world(world, cert="wrong-name", mode="testing")
    relay = world.relay()
    qid = world.submit(relay, ["bob@dst.test"])
    mx.wait_for_messages_blocking(1, timeout=10)  # type: ignore[attr-defined]
    [ev] = relay.wait_event("delivered", queue_id=qid)
    assert ev["sts_mode"] == "testing" and ev["verified"] is False


def test_sts_85_mode_none_behaves_as_no_policy(world: World) -> None:
    mx = world.mx_host("mx1.dst.test", "127.0.0.21", cert=None)
    world.domain("dst.test", [(10, "mx1.dst.test")])
    world.zone.add("_mta-sts.dst.test", "TXT", '"v=STSv1; id=n1"')
    world.zone.add("mta-sts.dst.test", "A", "127.0.0.80")
    world.policy.policy("dst.test", "version: STSv1\nmode: none\nmax_age: 86400\n")
    relay = world.relay()
    qid = world.submit(relay, ["bob@dst.test"])
    mx.wait_for_messages_blocking(1, timeout=10)
    [ev] = relay.wait_event("delivered", queue_id=qid)
    assert ev["sts_mode"] is None and ev["tls"] == "none"


def test_sts_68_wildcard_pattern_matches_one_label(world: World) -> None:
    mx = enforce_world(world, patterns=["*.dst.test"])
    relay = world.relay()
    qid = world.submit(relay, ["bob@dst.test"])
    mx.wait_for_messages_blocking(1, timeout=10)  # type: ignore[attr-defined]
    assert relay.wait_event("delivered", queue_id=qid)[0]["sts_mode"] == "enforce"


def test_sts_86_fallback_to_next_valid_mx(world: World) -> None:
    bad = world.mx_host("mx1.dst.test", "127.0.0.21", cert="expired")
    good = world.mx_host("mx2.dst.test", "127.0.0.22")
    world.domain("dst.test", [(10, "mx1.dst.test"), (20, "mx2.dst.test")])
    world.sts("dst.test", "enforce", ["*.dst.test"])
    relay = world.relay()
    qid = world.submit(relay, ["bob@dst.test"])
    good.wait_for_messages_blocking(1, timeout=10)
    assert relay.wait_event("delivered", queue_id=qid)[0]["mx"] == "mx2.dst.test"
    assert not any(s.saw("MAIL") for s in bad.sessions)


def test_sts_37_fetch_failure_without_cache_delivers_as_no_policy(world: World) -> None:
    mx = enforce_world(world, cert="wrong-name")
    world.policy.set("mta-sts.dst.test", status=404, body="not here")
    relay = world.relay()
    qid = world.submit(relay, ["bob@dst.test"])
    mx.wait_for_messages_blocking(1, timeout=10)  # type: ignore[attr-defined]
    [ev] = relay.wait_event("delivered", queue_id=qid)
    assert ev["sts_mode"] is None
    assert "MTA-STS" in (ev["reason"] or "")


def test_sts_31_redirect_not_followed(world: World) -> None:
    enforce_world(world)
    world.policy.set("mta-sts.dst.test", status=302, location="https://mta-sts.dst.test/other")
    relay = world.relay()
    world.submit(relay, ["bob@dst.test"])
    relay.wait_event("delivered")
    reqs = world.policy.requests_for("mta-sts.dst.test")
    assert [r.path for r in reqs] == ["/.well-known/mta-sts.txt"]


def test_sts_56_58_cached_enforce_survives_broken_txt_and_policy_host(world: World) -> None:
    mx = enforce_world(world)
    relay = world.relay(world.config(delivery={"connection_reuse_time": "0s"}))
    world.submit(relay, ["bob@dst.test"])
    mx.wait_for_messages_blocking(1, timeout=10)  # type: ignore[attr-defined]
    # An attacker breaks discovery AND downgrades the MX: the cached enforce policy must hold.
    world.zone.set_rcode("_mta-sts.dst.test", "SERVFAIL")
    world.policy.set("mta-sts.dst.test", status=500)
    mx.tls_context = None  # type: ignore[attr-defined]  # STARTTLS stripped
    qid = world.submit(relay, ["carol@dst.test"])
    [ev] = relay.wait_event("deferred", queue_id=qid)
    assert ev["sts_mode"] == "enforce"
    assert len(mx.messages) == 1  # type: ignore[attr-defined]
    # STS-57: the TXT record removed entirely -> still enforced
    world.zone.set_rcode("_mta-sts.dst.test", None)
    world.zone.remove("_mta-sts.dst.test", "TXT")
    run_cli(relay.config, "queue", "flush")
    relay.wait_event("deferred", count=2, queue_id=qid)
    assert len(mx.messages) == 1  # type: ignore[attr-defined]


def test_sts_59_83_id_change_refetch_then_flush_delivers(world: World) -> None:
    mx = enforce_world(world, patterns=["mx.old.test"])
    relay = world.relay(world.config(delivery={"retry_intervals": ["1h"]}))
    qid = world.submit(relay, ["bob@dst.test"])
    relay.wait_event("deferred", queue_id=qid)
    world.sts("dst.test", "enforce", ["mx1.dst.test"], txt_id="2")
    out = run_cli(relay.config, "queue", "flush")
    assert out.returncode == 0
    mx.wait_for_messages_blocking(1, timeout=10)  # type: ignore[attr-defined]
    relay.wait_event("delivered", queue_id=qid)
    assert len(world.policy.requests_for("mta-sts.dst.test")) == 2


def test_sts_64_restart_keeps_cache(world: World) -> None:
    mx = enforce_world(world)
    data = world.config()
    relay = world.relay(data)
    world.submit(relay, ["bob@dst.test"])
    mx.wait_for_messages_blocking(1, timeout=10)  # type: ignore[attr-defined]
    assert relay.stop() == 0
    relay = world.relay(data)
    world.submit(relay, ["carol@dst.test"])
    mx.wait_for_messages_blocking(2, timeout=10)  # type: ignore[attr-defined]
    assert len(world.policy.requests_for("mta-sts.dst.test")) == 1
    out = run_cli(relay.config, "policy", "--cache", "--json")
    [entry] = json.loads(out.stdout)
    assert entry["domain"] == "dst.test" and entry["mode"] == "enforce" and entry["txt_id"] == "1"


def test_sts_7_two_domains_independent(world: World) -> None:
    bad = world.mx_host("mx1.dst.test", "127.0.0.21", cert="expired")
    ok = world.mx_host("mx.other.test", "127.0.0.23")
    world.domain("dst.test", [(10, "mx1.dst.test")])
    world.domain("other.test", [(10, "mx.other.test")])
    world.sts("dst.test", "enforce", ["mx1.dst.test"])
    relay = world.relay()
    qid = world.submit(relay, ["bob@dst.test", "eve@other.test"])
    ok.wait_for_messages_blocking(1, timeout=10)
    relay.wait_event("deferred", queue_id=qid, recipient="bob@dst.test")
    relay.wait_event("delivered", queue_id=qid, recipient="eve@other.test")
    assert bad.messages == []


def test_policy_command_json_and_probe(world: World) -> None:
    enforce_world(world)
    world.mx_host("mx2.dst.test", "127.0.0.22", cert="wrong-name")
    world.domain("dst.test", [(20, "mx2.dst.test")])
    from tests.support.relay import write_config
    config = write_config(world.tmp, world.config())
    out = run_cli(config, "policy", "dst.test", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert (info["txt_id"], info["mode"], info["mx"], info["max_age"], info["error"]) == (
        "1", "enforce", ["mx1.dst.test"], 86400, None)
    out = run_cli(config, "policy", "dst.test", "--json", "--probe")
    rows = {r["mx"]: r for r in json.loads(out.stdout)["probe"]}
    assert rows["mx1.dst.test"]["matches_policy"] is True and rows["mx1.dst.test"]["cert_valid"] is True
    assert rows["mx1.dst.test"]["starttls"] is True and rows["mx1.dst.test"]["tls_version"].startswith("TLSv1.")
    assert rows["mx2.dst.test"]["matches_policy"] is False and rows["mx2.dst.test"]["cert_valid"] is False
    none = json.loads(run_cli(config, "policy", "nopolicy.test", "--json").stdout)
    assert none["mode"] is None and none["mx"] is None and none["max_age"] is None and none["error"]
    assert none["txt_id"] is None


def test_sts_4_address_literal_gets_no_lookup(world: World) -> None:
    mx = world.mx_host("lit.test", "127.0.0.34")
    relay = world.relay()
    world.submit(relay, ["bob@[127.0.0.34]"])
    mx.wait_for_messages_blocking(1, timeout=10)
    assert not any("_mta-sts" in name for name, _ in world.dns.queries)
    time.sleep(0.1)


def test_sts_3_smart_host_name_is_the_policy_domain(world: World) -> None:
    hub = world.mx_host("relay.provider.test", "127.0.0.35")
    world.sts("relay.provider.test", "enforce", ["relay.provider.test"])
    relay = world.relay(world.config(delivery={"relayhost": f"relay.provider.test:{world.smtp_port}"}))
    qid = world.submit(relay, ["bob@dst.test"])
    hub.wait_for_messages_blocking(1, timeout=10)
    [ev] = relay.wait_event("delivered", queue_id=qid)
    assert ev["sts_mode"] == "enforce" and ev["verified"] is True
    names = [n for n, _t in world.dns.queries]
    assert "_mta-sts.relay.provider.test" in names
    assert "_mta-sts.dst.test" not in names and "dst.test" not in names  # no MX lookup with a smart host


def test_sts_6_cname_recipient_domain_keeps_original_policy_domain(world: World) -> None:
    mx = world.mx_host("mx1.dst.test", "127.0.0.21")
    world.domain("dst.test", [(10, "mx1.dst.test")])
    world.zone.add("alias.test", "CNAME", "dst.test.")
    world.sts("alias.test", "enforce", ["mx1.dst.test"])
    relay = world.relay()
    qid = world.submit(relay, ["bob@alias.test"])
    mx.wait_for_messages_blocking(1, timeout=10)
    [ev] = relay.wait_event("delivered", queue_id=qid)
    assert ev["sts_mode"] == "enforce"
    assert ("_mta-sts.alias.test", "TXT") in world.dns.queries


def test_sts_82_policy_rechecked_before_lifetime_bounce(world: World) -> None:
    """Every attempt re-queries the TXT id (STS-83), so the one that gives up did too (STS-82); DSN-7."""
    mx = enforce_world(world, patterns=["mx.elsewhere.test"])
    relay = world.relay(world.config(delivery={"retry_intervals": ["1s"], "max_queue_lifetime": "2s"}))
    qid = world.submit(relay, ["bob@dst.test"])
    [ev] = relay.wait_event("bounced", queue_id=qid, timeout=20)
    attempts = ev["attempts"]
    assert attempts >= 2 and ev["sts_mode"] == "enforce" and ev["status"] == "5.4.7"
    assert world.dns.count("_mta-sts.dst.test", "TXT") >= attempts
    assert mx.sessions == []  # type: ignore[attr-defined]
    [dsn] = world.sender_mx.wait_for_messages_blocking(1, timeout=10)
    assert b"MTA-STS policy of dst.test" in dsn.data


def test_sts_87_valid_first_mx_means_second_never_contacted(world: World) -> None:
    first = world.mx_host("mx1.dst.test", "127.0.0.21")
    second = world.mx_host("mx2.dst.test", "127.0.0.22", cert="expired")
    world.domain("dst.test", [(10, "mx1.dst.test"), (20, "mx2.dst.test")])
    world.sts("dst.test", "enforce", ["*.dst.test"])
    relay = world.relay()
    world.submit(relay, ["bob@dst.test"])
    first.wait_for_messages_blocking(1, timeout=10)
    assert second.sessions == []


def test_sts_89_mx_lookup_failure_defers_regardless_of_policy(world: World) -> None:
    enforce_world(world)
    world.zone.set_rcode("dst.test", "SERVFAIL", "MX")
    relay = world.relay()
    qid = world.submit(relay, ["bob@dst.test"])
    [ev] = relay.wait_event("deferred", queue_id=qid)
    assert ev["status"] == "4.4.3"


def test_smtp_5_never_the_domain_address_when_mx_exists(world: World) -> None:
    own = world.mx_host("dst.test", "127.0.0.36")  # the domain's own A record, with a listener
    world.zone.add("down.dst.test", "A", "127.0.0.39")  # the only MX: nothing listens
    world.domain("dst.test", [(10, "down.dst.test")])
    relay = world.relay()
    qid = world.submit(relay, ["bob@dst.test"])
    relay.wait_event("deferred", queue_id=qid)
    assert own.sessions == []


def test_override_none_stops_enforcing_and_is_logged(world: World) -> None:
    mx = enforce_world(world, cert="expired")
    relay = world.relay(world.config(mta_sts={"overrides": {"dst.test": "none"}}))
    qid = world.submit(relay, ["bob@dst.test"])
    mx.wait_for_messages_blocking(1, timeout=10)  # type: ignore[attr-defined]
    assert relay.wait_event("delivered", queue_id=qid)[0]["sts_mode"] is None
    [ev] = relay.wait_event("policy", domain="dst.test")
    assert "override" in ev["reason"]
    assert world.policy.requests_for("mta-sts.dst.test") == []


def test_override_pinned_enforce_policy(world: World) -> None:
    mx = enforce_world(world, cert="expired", mode="testing")
    pinned = "version: STSv1\nmode: enforce\nmx: mx1.dst.test\nmax_age: 86400\n"
    relay = world.relay(world.config(mta_sts={"overrides": {"dst.test": pinned}}))
    qid = world.submit(relay, ["bob@dst.test"])
    [ev] = relay.wait_event("deferred", queue_id=qid)
    assert ev["sts_mode"] == "enforce"
    assert mx.messages == []  # type: ignore[attr-defined]
