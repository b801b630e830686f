"""`mta policy` as an operator reads it (issue 11 §4) and `mta policy --cache` with a damaged
cache (issue 10 item 3): the real CLI against fake DNS, policy host and MX on loopback."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import pytest

from mta.sts.cache import PolicyCache
from mta.sts.decide import CacheEntry
from mta.sts.policy import Policy
from tests.support.relay import run_cli, write_config
from tests.support.world import World


def config(world: World) -> Path:
    return write_config(world.tmp, world.config())


def test_issue11_s4_no_record_is_no_policy_found_not_a_failure(world: World) -> None:
    """Issue 11 §4: a domain without any MTA-STS record is RFC 8460's no-policy-found: no
    result_type (nothing to report), and the text output never prints Python's None."""
    cfg = config(world)
    out = run_cli(cfg, "policy", "nopolicy.test", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["result_type"] is None and info["policy_type"] == "no-policy-found"
    assert info["published"] is False and info["mode"] is None and info["txt_id"] is None
    text = run_cli(cfg, "policy", "nopolicy.test").stdout
    assert "None" not in text and "validation-failure" not in text
    assert "mode:    none" in text and "none published" in text


def test_issue11_s4_probe_text_never_prints_none(world: World) -> None:
    """Issue 11 §4: `--probe` text output for a domain without policy and without MX says
    "none"/leaves fields out; JSON keeps null."""
    world.mx_host("mx1.plain.test", "127.0.0.23", cert=None)
    world.domain("plain.test", [(10, "mx1.plain.test")])
    cfg = config(world)
    for domain in ("plain.test", "nomx.test"):
        out = run_cli(cfg, "policy", domain, "--probe")
        assert out.returncode == 0, out.stderr
        assert "None" not in out.stdout and "True" not in out.stdout and "False" not in out.stdout, out.stdout
    text = run_cli(cfg, "policy", "plain.test", "--probe").stdout
    assert "MX mx1.plain.test [127.0.0.23]: matches=none starttls=no" in text
    assert "MX lookup failed" in run_cli(cfg, "policy", "nomx.test", "--probe").stdout
    rows = json.loads(run_cli(cfg, "policy", "nomx.test", "--probe", "--json").stdout)["probe"]
    assert rows[0]["mx"] is None and rows[0]["error"]


@pytest.mark.req("STS-91")
def test_issue11_s4_fetch_failure_keeps_its_result_type(world: World) -> None:
    """Issue 11 §4 (the other side): a published record whose policy cannot be fetched is a
    reportable failure, so result_type stays (STS-91)."""
    world.sts("broken.test", "enforce", ["mx.broken.test"])
    world.policy.set("mta-sts.broken.test", status=404)
    info = json.loads(run_cli(config(world), "policy", "broken.test", "--json").stdout)
    assert (info["policy_type"], info["result_type"], info["published"]) == ("sts", "sts-policy-fetch-error", True)


@pytest.mark.req("STS-64")
def test_issue10_item3_policy_cache_lists_damaged_rows_and_unreadable_file(world: World) -> None:
    """Issue 10 item 3: `mta policy --cache` shows a row that no longer parses (text and JSON)
    and exits 1; an unreadable cache file is shown the same way."""
    cfg = config(world)
    path = world.tmp / "queue" / "sts-cache.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    _fill(path, {"good.test": Policy("enforce", ("mx.good.test",), 86400),
                 "bad.test": Policy("enforce", ("mx.bad.test",), 86400)})
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE policies SET policy_text = 'mode: sometimes' WHERE domain = 'bad.test'")
    conn.close()
    out = run_cli(cfg, "policy", "--cache", "--json")
    assert out.returncode == 1, out.stderr
    rows = {r["domain"]: r for r in json.loads(out.stdout)}
    assert rows["good.test"]["mode"] == "enforce" and rows["good.test"]["error"] is None
    assert rows["bad.test"]["mode"] is None and "unreadable" in rows["bad.test"]["error"]
    text = run_cli(cfg, "policy", "--cache")
    assert text.returncode == 1
    [bad_line] = [line for line in text.stdout.splitlines() if line.startswith("bad.test")]
    assert "ERROR" in bad_line and "not applied" in bad_line
    path.write_bytes(b"not a database at all" * 200)
    for extra in ((), ("--json",)):
        out = run_cli(cfg, "policy", "--cache", *extra)
        assert out.returncode == 1 and "no cached policy can be applied" in out.stdout, out.stdout + out.stderr


def _fill(path: Path, policies: dict[str, Policy]) -> None:
    async def run() -> None:
        cache = PolicyCache(path)
        try:
            for domain, policy in policies.items():
                await cache.put(CacheEntry(domain, "1", policy, 1.8e9, 1.8e9 + 86400))
        finally:
            await cache.close()

    asyncio.run(run())
