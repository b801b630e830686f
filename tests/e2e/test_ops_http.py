"""The operations endpoint of a real `mta serve` (issue 14): readiness, the queue API, errors.

OPS-4: /readyz answers 503 naming the spool while it is full (below the submission reserve),
200 again once space is back. OPS-5: with http.admin_token set, /api refuses a missing or wrong
token; the probes and /metrics never need it. OPS-6: the queue API returns what
`mta queue list --json` prints and carries out flush, hold, release and delete. OPS-7: malformed
requests get a 4xx with a JSON error, never a 500.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from mta.spool.store import SUBMISSION_RESERVE
from tests.e2e.test_disk_faults import fill, submit, tmpfs, unanswered_dns_config
from tests.support.ops import get_json, request, scrape, value, wait_up
from tests.support.relay import RelayProcess, deep_merge, free_port, run_cli, write_config

TOKEN = "t0ken-for-the-queue-api-0123456789"


def healthcheck(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mta.healthcheck", "--config", str(config), "--timeout", "4"],
                          capture_output=True, text=True, timeout=20)


def start(tmp_path: Path, **http: str) -> tuple[RelayProcess, str]:
    """A relay whose mail stays queued (DNS never answers), with the endpoint on loopback."""
    data = deep_merge(unanswered_dns_config(tmp_path), {"http": {"listen": f"127.0.0.1:{free_port()}", **http}})
    relay = RelayProcess(write_config(tmp_path, data), data).start()
    base = f"http://{data['http']['listen']}"
    wait_up(base)
    return relay, base


def test_ops_4_readyz_503_while_the_spool_is_full_then_200(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "queue", size="4m") as spool:
        relay, base = start(tmp_path)
        try:
            assert get_json(base, "/readyz") == (200, {"status": "ready"})
            ballast = fill(spool, leave=SUBMISSION_RESERVE // 2)
            status, body = get_json(base, "/readyz")
            assert status == 503 and body["status"] == "not ready"
            [problem] = body["problems"]
            assert problem["check"] == "spool" and "below the reserve" in problem["error"], body
            code, _text = submit(relay)
            assert code == 452
            assert get_json(base, "/healthz") == (200, {"status": "ok"})  # alive, just not ready
            # The image's HEALTHCHECK (mta.healthcheck) asks /readyz when [http] listen is set.
            check = healthcheck(relay.config)
            assert check.returncode == 1 and "/readyz answered 503" in check.stderr, check.stderr
            ballast.unlink()
            assert get_json(base, "/readyz") == (200, {"status": "ready"})
            assert healthcheck(relay.config).returncode == 0
            samples = scrape(base)
            assert value(samples, "mta_messages_rejected_total", code="452") == 1
        finally:
            relay.kill()


def test_ops_4_readyz_names_a_listener_that_does_not_answer(tmp_path: Path) -> None:
    """A stopped listener process still completes TCP handshakes (the kernel does): readiness
    waits for its greeting, so it is reported, and ready again once the process runs."""
    relay, base = start(tmp_path)
    try:
        [started] = relay.wait_event("started")
        child = started["submission_pid"]
        os.kill(child, signal.SIGSTOP)
        try:
            status, body = get_json(base, "/readyz")
            assert status == 503, body
            [problem] = body["problems"]
            listen = relay.data["submission"]["listen"][0]
            assert problem == {"check": "listener", "error": f"listener {listen} did not greet within 3s"}
        finally:
            os.kill(child, signal.SIGCONT)
        assert get_json(base, "/readyz") == (200, {"status": "ready"})
    finally:
        relay.kill()


def test_ops_5_api_refuses_missing_or_wrong_token(tmp_path: Path) -> None:
    relay, base = start(tmp_path, admin_token=TOKEN)
    try:
        for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": f"Basic {TOKEN}"},
                        {"Authorization": "Bearer"}, {"Authorization": f"Bearer {TOKEN}x"}):
            for method, path in (("GET", "/api/queue"), ("POST", "/api/queue/flush"),
                                 ("DELETE", "/api/queue/0000000000000000000AA")):
                status, hdrs, body = request(base, path, method=method, headers=headers)
                assert status == 401, (headers, path, status)
                assert hdrs["WWW-Authenticate"].startswith("Bearer")
                assert "error" in json.loads(body) and TOKEN not in body.decode()
        assert get_json(base, "/api/queue", token=TOKEN) == (200, [])
        for path in ("/metrics", "/healthz", "/readyz"):  # scrapers and orchestrators need no token
            assert request(base, path)[0] == 200
        assert TOKEN not in relay.log_text()
    finally:
        relay.kill()


def test_ops_6_queue_api_matches_the_cli_and_operates(tmp_path: Path) -> None:
    relay, base = start(tmp_path)
    try:
        code, text = submit(relay)
        assert code == 250
        qid = text.rsplit(" ", 1)[-1]
        relay.wait_event("deferred", queue_id=qid)
        cli = run_cli(relay.config, "queue", "list", "--json")
        assert get_json(base, "/api/queue") == (200, json.loads(cli.stdout))
        status, one = get_json(base, f"/api/queue/{qid}")
        assert status == 200 and one["id"] == qid and "Subject: kept" in one["headers"]

        assert get_json(base, f"/api/queue/{qid}/hold", method="POST") == (
            202, {"op": "hold", "id": qid, "status": "accepted"})
        relay.wait_event("held", queue_id=qid)
        assert get_json(base, f"/api/queue/{qid}")[1]["held"] is True
        assert get_json(base, f"/api/queue/{qid}/release", method="POST")[0] == 202
        relay.wait_event("deferred", count=2, queue_id=qid)  # released = tried again at once
        assert get_json(base, "/api/queue/flush", method="POST")[0] == 202
        relay.wait_event("deferred", count=3, queue_id=qid)
        assert get_json(base, f"/api/queue/{qid}/flush", method="POST")[0] == 202
        relay.wait_event("deferred", count=4, queue_id=qid)
        assert get_json(base, f"/api/queue/{qid}", method="DELETE")[0] == 202
        relay.wait_event("deleted", queue_id=qid)
        assert get_json(base, f"/api/queue/{qid}")[0] == 404
        assert get_json(base, "/api/queue") == (200, [])
        assert [e["op"] for e in relay.events("api")] == ["hold", "release", "flush", "flush", "delete"]
    finally:
        relay.kill()


def test_ops_7_malformed_requests_get_4xx_json(tmp_path: Path) -> None:
    relay, base = start(tmp_path)
    missing = "0000000000000000000AA"
    try:
        cases = [
            ("GET", "/api/queue/not-an-id", 400),
            ("GET", "/api/queue/..%2F..%2Fetc%2Fpasswd", 400),
            ("DELETE", "/api/queue/abc", 400),
            ("POST", "/api/queue/zz/hold", 400),
            ("GET", f"/api/queue/{missing}", 404),
            ("DELETE", f"/api/queue/{missing}", 404),
            ("POST", f"/api/queue/{missing}/hold", 404),
            ("POST", f"/api/queue/{missing}/explode", 404),
            ("GET", "/nowhere", 404),
            ("PUT", "/api/queue", 405),
            ("POST", "/metrics", 405),
            ("GET", "/api/queue/flush", 400),
        ]
        for method, path, expected in cases:
            status, headers, body = request(base, path, method=method)
            assert status == expected, (method, path, status, body)
            assert headers["Content-Type"].startswith("application/json"), (method, path)
            assert isinstance(json.loads(body)["error"], str)
        status, _h, body = request(base, "/api/queue/flush", method="POST", data=b"x" * 200_000)
        assert status == 413 and "error" in json.loads(body)
        # Not even HTTP: aiohttp answers 400 itself (plain text), never a 500.
        host, port = base.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(b"\x16\x03\x01 garbage \r\n\r\n")
            assert s.recv(100).split(b" ")[1] == b"400"
        assert request(base, "/healthz")[0] == 200
        assert "Traceback" not in relay.log_text()
    finally:
        relay.kill()
