"""TLS reporting edge cases through a real `mta serve`: what is left out of reports (RPT-13) and
how report mails themselves are delivered (RPT-19)."""

from __future__ import annotations

import datetime
import json
from typing import Any

from tests.support.dkim import make_key
from tests.support.relay import RelayProcess, run_cli
from tests.support.world import World

RUA = "tlsrpt@rua.test"


def show(relay: RelayProcess, day: str) -> dict[str, Any]:
    out = run_cli(relay.config, "tlsrpt", "show", "--date", day, "--json", timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    return {e["domain"]: e for e in json.loads(out.stdout)["reports"]}


def test_rpt_13_rpt_19_refusals_unreported_and_report_mail_delivered_despite_enforce(world: World) -> None:
    """ok.test delivers under enforce; dead.test's only MX refuses connections (RPT-13: not
    reported, only policy and TLS results are). The report for ok.test goes by mail to rua.test,
    whose enforce policy cannot be met (expired certificate): the report mail is delivered anyway
    and its session is not counted (RPT-19)."""
    world.mx_host("mx.rua.test", "127.0.0.32", cert="expired")
    world.domain("rua.test", [(10, "mx.rua.test")])
    world.sts("rua.test", "enforce", ["mx.rua.test"])
    ok = world.mx_host("mx.ok.test", "127.0.0.33")
    world.domain("ok.test", [(10, "mx.ok.test")])
    world.sts("ok.test", "enforce", ["mx.ok.test"])
    world.zone.add("mx.dead.test", "A", "127.0.0.39")  # nothing listens there: connection refused
    world.domain("dead.test", [(10, "mx.dead.test")])
    world.sts("dead.test", "enforce", ["mx.dead.test"])
    for domain in ("ok.test", "dead.test"):
        world.zone.add(f"_smtp._tls.{domain}", "TXT", f'"v=TLSRPTv1; rua=mailto:{RUA}"')
    key = make_key(world.tmp / "keys", "relay.test", "rpt")  # RPT-18: report mails are DKIM-signed
    relay = world.relay(world.config(tlsrpt={
        "enabled": True, "contact_info": "tlsrpt@relay.test", "report_sender": "reports@relay.test",
        "db_path": str(world.tmp / "queue" / "tlsrpt.db")}, dkim={"keys": [key.config()]}))
    delivered = world.submit(relay, ["a@ok.test"])
    deferred = world.submit(relay, ["b@dead.test"])
    relay.wait_event("delivered", queue_id=delivered)
    [ev] = relay.wait_event("deferred", queue_id=deferred)
    assert ev["sts_mode"] == "enforce" and "refused" in ev["reply"]
    today = datetime.datetime.now(datetime.UTC).date().isoformat()
    reports = show(relay, today)
    assert "dead.test" not in reports  # RPT-13: the refused connection left nothing to report
    [policy] = reports["ok.test"]["report"]["policies"]
    assert policy["summary"] == {"total-successful-session-count": 1, "total-failure-session-count": 0}
    out = run_cli(relay.config, "tlsrpt", "send", "--date", today, "--json", timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    [mail] = world.mxs["mx.rua.test"].wait_for_messages_blocking(1, timeout=20)
    assert mail.rcpt_tos == [RUA] and b"TLS-Report-Domain: ok.test" in mail.data
    relay.wait_event("delivered", count=2)
    assert "rua.test" not in show(relay, today)  # RPT-19: the report mail's failed session is not counted
    assert len(ok.messages) == 1
