"""Issue 10 items 10 and 11 through a real `mta serve`: outgoing SMTP binds to
`delivery.bind_address`, and the TLS report's sending-mta-ip is that session's local address."""

from __future__ import annotations

import datetime
import json

from tests.support.dkim import make_key
from tests.support.relay import run_cli
from tests.support.world import World

SOURCE = "127.0.0.77"


def test_issue10_item10_item11_cfg_2_trust_3_bind_address_is_peer_and_reported_sending_ip(world: World) -> None:
    ok = world.mx_host("mx.ok.test", "127.0.0.31")
    world.domain("ok.test", [(10, "mx.ok.test")])
    bad = world.mx_host("mx.badname.test", "127.0.0.32", cert="wrong-name")
    world.domain("badname.test", [(10, "mx.badname.test")])
    world.sts("badname.test", "testing", ["mx.badname.test"])  # delivered anyway, reported as a failure
    world.zone.add("_smtp._tls.badname.test", "TXT", '"v=TLSRPTv1; rua=mailto:tlsrpt@ok.test"')
    data = world.config(delivery={"bind_address": SOURCE},
                        tlsrpt={"enabled": True, "contact_info": "tlsrpt@relay.test",
                                "report_sender": "reports@relay.test",
                                "db_path": str(world.tmp / "queue" / "tlsrpt.db")},
                        dkim={"keys": [make_key(world.tmp / "dkim", "relay.test", "s", "ed25519-sha256").config()]})
    relay = world.relay(data)
    world.submit(relay, ["bob@ok.test"])
    world.submit(relay, ["bob@badname.test"])
    relay.wait_event("delivered", count=2)
    # Item 10: the fake MX saw our connection come from the configured source address.
    assert [s.peer[0] for s in ok.sessions] == [SOURCE]
    assert [s.peer[0] for s in bad.sessions] == [SOURCE]
    today = datetime.datetime.now(datetime.UTC).date().isoformat()
    out = run_cli(relay.config, "tlsrpt", "show", "--date", today, "--json", timeout=30)
    assert out.returncode == 0, out.stderr
    [entry] = [e for e in json.loads(out.stdout)["reports"] if e["domain"] == "badname.test"]
    [policy] = entry["report"]["policies"]
    [detail] = policy["failure-details"]
    assert detail["result-type"] == "certificate-host-mismatch"
    assert detail["sending-mta-ip"] == SOURCE  # item 11: getsockname() of the session, not 127.0.0.1
    assert detail["receiving-ip"] == "127.0.0.32"
    # `mta policy --probe` leaves from the same address as deliveries.
    probe = run_cli(relay.config, "policy", "ok.test", "--probe", "--json", timeout=30)
    assert probe.returncode == 0, probe.stderr
    assert len(ok.sessions) == 2 and ok.sessions[-1].peer[0] == SOURCE
