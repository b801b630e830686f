"""Several `mta serve` nodes on one real PostgreSQL (issue 15): shared policies, one report per domain,
outages of the database, the node table."""

from __future__ import annotations

import datetime
import email
import email.policy
import gzip
import json
import subprocess
import sys
import time
from typing import Any

import psycopg
import pytest

from tests.support.dkim import make_key
from tests.support.ops import request, scrape, value
from tests.support.postgres import PostgresServer
from tests.support.relay import RelayProcess, deep_merge, free_port, listen_address, run_cli, wait_port, write_config
from tests.support.world import World

# The test body is bounded; the PostgreSQL server starts once per session (initdb, several seconds on
# a busy machine) in the first test's setup, which is not counted against that one test.
pytestmark = pytest.mark.timeout(30, func_only=True)

RUA = "tlsrpt@rua.test"
TLSRPT = {"enabled": True, "organization_name": "Test Org", "contact_info": "tlsrpt@relay.test",
          "report_sender": "reports@relay.test"}


def node(world: World, url: str, name: str, extra: dict[str, Any] | None = None, wait: bool = True) -> RelayProcess:
    """A relay with its own spool (what stays per node) on the shared database `url`."""
    spool = world.tmp / name / "queue"
    key = make_key(world.tmp / "keys", "relay.test", "rpt")  # report mails are DKIM-signed (RPT-18)
    data = world.config(queue={"path": str(spool)}, mta_sts={"cache_path": str(spool / "sts-cache.db")},
                        tlsrpt={**TLSRPT, "db_path": str(spool / "tlsrpt.db")}, dkim={"keys": [key.config()]},
                        cluster={"database": url, "node_name": name, "heartbeat_interval": "1s"})
    data = deep_merge(data, extra or {})
    relay = RelayProcess(write_config(world.tmp, data, f"{name}.toml"), data).start(wait=False)
    world.relays.append(relay)
    if wait:
        ready(relay)
    return relay


def ready(relay: RelayProcess) -> None:
    try:
        wait_port(*listen_address(relay.data), timeout=20)
    except TimeoutError:
        raise AssertionError("relay did not start:\n" + relay.log_text()) from None


def nodes_started(world: World, url: str, names: list[str],
                  extra: dict[str, Any] | None = None) -> list[RelayProcess]:
    """Several nodes started side by side (the machine may be slow; starting them in turn adds up)."""
    relays = [node(world, url, name, extra, wait=False) for name in names]
    for relay in relays:
        ready(relay)
    return relays


def sts_domain(world: World, domain: str, address: str, *, mode: str = "enforce", cert: str = "valid",
               patterns: list[str] | None = None) -> None:
    world.mx_host(f"mx.{domain}", address, cert=cert)
    world.domain(domain, [(10, f"mx.{domain}")])
    world.sts(domain, mode, patterns or [f"mx.{domain}"])
    world.zone.add(f"_smtp._tls.{domain}", "TXT", f'"v=TLSRPTv1; rua=mailto:{RUA}"')


def stored_counts(url: str) -> dict[str, tuple[int, int]]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT domain, sum(successful), sum(failed) FROM mta_tlsrpt_sessions "
                            "GROUP BY domain").fetchall()
    return {str(d): (int(ok), int(bad)) for d, ok, bad in rows}


def wait_for(check: Any, timeout: float = 15.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        time.sleep(0.1)


@pytest.mark.req("CLU-3")
# Six Python processes start here (three nodes, then three `mta tlsrpt send` at once): about 8 s on an
# idle 2-core machine, but process start-up alone stretches past 30 s when the machine is shared.
@pytest.mark.timeout(60, func_only=True)
def test_clu_3_three_nodes_send_one_report_per_domain_with_the_summed_counts(pg_url: str, world: World) -> None:
    world.mx_host("mx.rua.test", "127.0.0.49")
    world.domain("rua.test", [(10, "mx.rua.test")])
    domains = {"one.test": "127.0.0.50", "two.test": "127.0.0.51", "try.test": "127.0.0.52"}
    for domain, address in domains.items():
        if domain == "try.test":  # testing mode, MX outside the policy: delivered, counted as failures
            sts_domain(world, domain, address, mode="testing", patterns=["mx.elsewhere.test"])
        else:
            sts_domain(world, domain, address)
    # One process per node (no listener child): the cluster state lives in that process either way,
    # and three nodes plus three CLIs are a lot for a small machine.
    nodes = nodes_started(world, pg_url, ["n1", "n2", "n3"], {"submission": {"separate_process": False}})
    per_node = [1, 1, 2]  # mails per domain from n1, n2, n3: 4 per domain in all
    for relay, n in zip(nodes, per_node, strict=True):
        for domain in domains:
            for _ in range(n):
                world.submit(relay, [f"bob@{domain}"])
    for relay, n in zip(nodes, per_node, strict=True):
        relay.wait_event("delivered", count=len(domains) * n)
    today = datetime.datetime.now(datetime.UTC).date().isoformat()
    procs = [subprocess.Popen([sys.executable, "-m", "mta", "tlsrpt", "send", "--date", today, "--json",
                               "--config", str(r.config)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in nodes]
    outcomes = []
    for p in procs:
        out, err = p.communicate(timeout=25)
        assert p.returncode == 0, out + err
        outcomes += json.loads(out)
    sent = sorted(o["domain"] for o in outcomes if o["status"] == "sent")
    assert sent == sorted(domains)  # exactly one sender per domain
    assert sorted(o["status"] for o in outcomes).count("skipped") == 2 * len(domains)
    mails = world.mxs["mx.rua.test"].wait_for_messages_blocking(len(domains), timeout=15)
    time.sleep(1.0)
    assert len(world.mxs["mx.rua.test"].messages) == len(domains)
    for m in mails:
        msg = email.message_from_bytes(m.data, policy=email.policy.default)
        [att] = [p for p in msg.iter_attachments() if p.get_content_type() == "application/tlsrpt+gzip"]
        report = json.loads(gzip.decompress(att.get_content()))
        [pol] = report["policies"]
        summary = pol["summary"]
        if pol["policy"]["policy-domain"] == "try.test":
            assert summary == {"total-successful-session-count": 0, "total-failure-session-count": 4}
        else:
            assert summary == {"total-successful-session-count": 4, "total-failure-session-count": 0}


@pytest.mark.req("CLU-1", "CLU-7")
def test_clu_1_policy_fetched_by_one_node_protects_another_whose_policy_host_is_unreachable(
        pg_url: str, world: World) -> None:
    sts_domain(world, "sec.test", "127.0.0.60", cert="wrong-name")  # enforce: this MX must be refused
    dead = {"mta_sts": {"https_port": free_port()}}  # nothing listens: no policy can be fetched
    b = node(world, pg_url, "b", dead, wait=False)
    a = node(world, pg_url, "a")
    ready(b)
    world.submit(a, ["bob@sec.test"])
    [ev] = a.wait_event("deferred", count=1)
    assert ev["sts_mode"] == "enforce"
    wait_for(lambda: psycopg.connect(pg_url).execute("SELECT count(*) FROM mta_sts_policies").fetchone()[0] == 1,
             what="the policy in the database")
    time.sleep(1.5)  # b's sync interval
    world.submit(b, ["carol@sec.test"])
    [ev] = b.wait_event("deferred", count=1)
    assert ev["sts_mode"] == "enforce", ev
    assert not b.events("delivered")
    listing = run_cli(b.config, "policy", "--cache", "--json")
    assert listing.returncode == 0, listing.stderr
    assert [r["domain"] for r in json.loads(listing.stdout)] == ["sec.test"]
    # The node table: every node, its queue (b holds its deferred message) and a recent heartbeat (CLU-7).
    status = run_cli(a.config, "cluster", "status", "--json")
    assert status.returncode == 0, status.stderr
    rows = {r["node"]: r for r in json.loads(status.stdout)}
    assert set(rows) == {"a", "b"}
    for r in rows.values():
        assert not r["stale"] and r["heartbeat_age"] < 5 and r["queued"] == 1 and r["oldest"], r
    text = run_cli(b.config, "cluster", "status")
    assert text.returncode == 0 and text.stdout.splitlines()[0].split()[:4] == ["NODE", "QUEUED", "ACTIVE",
                                                                                "DEFERRED"], text.stdout
    # The control: the same relay without the shared cache delivers to the impostor.
    alone = world.config(queue={"path": str(world.tmp / "alone" / "queue")},
                         mta_sts={"cache_path": str(world.tmp / "alone" / "sts.db"), **dead["mta_sts"]})
    c = world.relay(alone, name="alone.toml")
    world.submit(c, ["dave@sec.test"])
    c.wait_event("delivered", count=1)


@pytest.mark.req("CLU-4", "CLU-6")
def test_clu_6_database_restarted_mid_run_loses_no_counts(pg_server: PostgresServer, pg_url: str,
                                                          world: World) -> None:
    own_pg, url = pg_server, pg_url  # the session's server, stopped and started again below
    sts_domain(world, "ok.test", "127.0.0.61")
    nodes = nodes_started(world, url, ["r1", "r2"])
    for relay in nodes:
        for _ in range(3):
            world.submit(relay, ["bob@ok.test"])
    for relay in nodes:
        relay.wait_event("delivered", count=3)
    wait_for(lambda: stored_counts(url).get("ok.test") == (6, 0), what="6 counts stored")
    own_pg.stop()
    for relay in nodes:  # mail keeps flowing while the database is down
        for _ in range(2):
            world.submit(relay, ["bob@ok.test"])
    for relay in nodes:
        relay.wait_event("delivered", count=5)
        relay.wait_event("database", status="unreachable")
    own_pg.start()
    wait_for(lambda: stored_counts(url).get("ok.test") == (10, 0), what="10 counts after the restart")
    for relay in nodes:
        relay.wait_event("database", status="reachable")
    time.sleep(1.5)
    assert stored_counts(url)["ok.test"] == (10, 0)  # none twice


@pytest.mark.req("CLU-4", "CLU-5")
def test_clu_5_database_down_at_start_mail_flows_and_counts_arrive_later(
        own_pg: PostgresServer, world: World) -> None:
    url = own_pg.url().replace("postgres@", "postgres:pw-not-logged@")  # nothing listens there yet
    sts_domain(world, "ok.test", "127.0.0.62")
    http = f"http://127.0.0.1:{free_port()}"
    relay = node(world, url, "solo", {"http": {"listen": http.removeprefix("http://")}})
    [down] = relay.wait_event("database", status="unreachable")
    assert "pw-not-logged" not in relay.log_text() and "127.0.0.1" in down["database"]
    world.submit(relay, ["bob@ok.test"])
    world.submit(relay, ["bob@ok.test"])
    relay.wait_event("delivered", count=2)
    # Ready all the same (the database is not in the mail path); the metric says it is down.
    assert request(http, "/readyz")[0] == 200
    assert value(scrape(http), "mta_cluster_database_up") == 0
    own_pg.start()
    relay.wait_event("database", status="reachable", timeout=15)
    assert value(scrape(http), "mta_cluster_database_up") == 1
    wait_for(lambda: stored_counts(own_pg.url()).get("ok.test") == (2, 0), what="counts after the start")

    # The node row comes with the next heartbeat after the database is back (1 s here), which may
    # land after the counts: poll, bounded.
    def nodes() -> list[str]:
        status = run_cli(relay.config, "cluster", "status", "--json")
        assert status.returncode == 0, status.stderr
        return [r["node"] for r in json.loads(status.stdout)]

    assert wait_for(nodes, what="the node's heartbeat row") == ["solo"]


@pytest.mark.req("CLU-8")
def test_clu_8_serve_refuses_a_schema_from_a_newer_mta(pg_url: str, world: World) -> None:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE mta_schema (id integer PRIMARY KEY, version integer NOT NULL)")
        conn.execute("INSERT INTO mta_schema VALUES (1, 42)")
    data = world.config(cluster={"database": pg_url})
    out = run_cli(write_config(world.tmp, data), "serve", timeout=25)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith("mta: cluster.database: schema version 42") and "newer mta" in lines[-1], out.stderr
