"""The container image, built from the Dockerfile and run with podman (issue 19; `make container-test`).

`tests/container/build.sh` builds the image first (MTA_CONTAINER_IMAGE names it); without it these
tests skip, so `make test` does not need podman. Every relay container runs the README's own
command (tests/container/podman.py) with `--network host`: the relay, the fake DNS and the fake MX
all talk over the host's loopback. One-shot commands run with `--network none`. No container ever
joins podman's bridge network (which would route test traffic to private addresses and turn on
the host's IP forwarding).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import smtplib
import time
import tomllib
from collections.abc import Iterator
from email.message import EmailMessage

import pytest

from tests.container.podman import (
    IMAGE,
    ROOT,
    Container,
    container,
    loopback_address,
    podman,
    readme_command,
    run_args,
    volume,
)
from tests.support.fake_dns import FakeDns
from tests.support.fake_mx import FakeMx
from tests.support.relay import free_port

pytestmark = pytest.mark.skipif(not IMAGE, reason="needs the image: run `make container-test`")

README_RUN = ["podman", "run"]


@pytest.fixture
def world() -> Iterator[tuple[FakeDns, FakeMx]]:
    """Fake DNS on 127.x.y.z:53 and a fake MX on 127.x.y.z:25 for example.test."""
    mx = FakeMx(loopback_address(), port=25).start_in_thread()
    try:
        with FakeDns(host=loopback_address(), port=53) as dns_server:
            dns_server.zone.add("example.test", "MX", "10 mx.example.test.")
            dns_server.zone.add("mx.example.test", "A", mx.address)
            yield dns_server, mx
    finally:
        mx.stop_thread()


def message(to: str = "user@example.test") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "app@sender.test"
    msg["To"] = to
    msg["Subject"] = "from the host"
    msg.set_content("hello through the container\n")
    return msg


def submit(port: int, source: str | None = None, to: str = "user@example.test") -> tuple[int, str]:
    """Submit one message from the host; (code, text) of the final reply or of the refusal."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10, source_address=(source, 0) if source else None) as s:
        try:
            s.send_message(message(to))
        except smtplib.SMTPRecipientsRefused as exc:
            code, text = exc.recipients[to]
            return code, text.decode()
        return 250, "ok"


@contextlib.contextmanager
def quick_start(extra_env: dict[str, str], volume_name: str | None = None, http_port: int | None = None,
                extra_args: tuple[str, ...] = ()) -> Iterator[tuple[Container, int]]:
    """The README's host-network `podman run`, on free ports, with its own volume unless given."""
    port = free_port()
    with contextlib.ExitStack() as stack:
        vol = volume_name or stack.enter_context(volume())
        args = run_args(readme_command("podman", "run", having="--network"), volume_name=vol, port=port,
                        http_port=http_port or free_port(), extra_env=extra_env, extra_args=extra_args)
        box = stack.enter_context(container(args, listen=("127.0.0.1", port)))
        yield box, port


def http_get(port: int, path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def test_ctr_1_5_image_is_non_root_with_healthcheck_and_valid_config() -> None:
    [info] = json.loads(podman("image", "inspect", IMAGE).stdout)
    assert info["Config"]["User"] == "mta"
    assert info["Healthcheck"]["Test"] == ["CMD", "python3", "-m", "mta.healthcheck"]  # kept by --format docker
    assert "/var/spool/mta" in info["Config"]["Volumes"]
    # `mta check-config` on the image's own config, as shipped and with the README's variables.
    r = podman("run", "--rm", "--network", "none", IMAGE, "check-config")
    assert r.stdout.strip() == "/etc/mta/config.toml: ok"
    env = [w for w in readme_command("podman", "run", having="--network") if w.startswith("MTA_")]
    r = podman("run", "--rm", "--network", "none", *[f"--env={e}" for e in env], IMAGE, "check-config")
    assert r.stdout.strip() == "/etc/mta/config.toml: ok (overridden by MTA_HOSTNAME, MTA_LISTEN, MTA_HTTP_LISTEN)"
    bad = podman("run", "--rm", "--network", "none", "--env=MTA_RELAY_NETWORKS=everyone", IMAGE, "check-config",
                 check=False)
    assert bad.returncode == 1
    assert "$MTA_RELAY_NETWORKS: submission.relay_networks[0]: 'everyone' is not a network" in bad.stderr


def test_ctr_8_sendmail_is_linked_to_the_package_script() -> None:
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["sendmail"]
    r = podman("run", "--rm", "--network", "none", "--entrypoint", "sh", IMAGE, "-c",
               "test -x /usr/sbin/sendmail && readlink /usr/sbin/sendmail")
    assert r.stdout.strip() == "/opt/mta/bin/sendmail"


def test_ctr_1_2_6_8_readme_quick_start_delivers_from_the_host_to_a_loopback_mx(world: tuple[FakeDns, FakeMx]) -> None:
    dns_server, mx = world
    http_port = free_port()
    with quick_start({"MTA_NAMESERVERS": dns_server.host}, http_port=http_port) as (box, port):
        # The relay runs as the image's user, not root (uid 10025 in the Dockerfile).
        status = box.exec("cat", "/proc/1/status").stdout
        [uids] = [line.split()[1:] for line in status.splitlines() if line.startswith("Uid:")]
        assert uids == ["10025"] * 4
        assert submit(port) == (250, "ok")
        [got] = mx.wait_for_messages_blocking(1, timeout=15)
        assert got.rcpt_tos == ["user@example.test"]
        assert b"hello through the container" in got.data
        # MTA_HOSTNAME from the README is the EHLO name the MX saw.
        assert mx.sessions[0].ehlo_names == ["relay.example.org"]
        # An application inside the container: /usr/sbin/sendmail -t -i, as cron or PHP call it.
        sent = box.exec("/usr/sbin/sendmail", "-t", "-i", stdin=message("other@example.test").as_string())
        assert sent.returncode == 0, sent.stderr
        got = mx.wait_for_messages_blocking(2, timeout=15)[1]
        assert got.rcpt_tos == ["other@example.test"]
        # The MX's 250 comes before mta's state write: give the spool a moment to drain.
        deadline = time.monotonic() + 10
        while "Mail queue is empty" not in (listing := box.exec("mta", "queue", "list").stdout):
            assert time.monotonic() < deadline, listing
            time.sleep(0.2)
        # The HTTP endpoint from the host: ready, and the message counted.
        status, body = http_get(http_port, "/readyz")
        assert (status, json.loads(body)) == (200, {"status": "ready"})
        status, metrics = http_get(http_port, "/metrics")
        assert status == 200 and f'mta_messages_received_total{{listener="smtp:{port}"}} 1.0' in metrics
        # HEALTHCHECK (GET /readyz) passes, and the same check fails where nothing listens.
        assert podman("healthcheck", "run", box.id, check=False).returncode == 0
        down = box.exec("python3", "-m", "mta.healthcheck", "--timeout", "2", check=False,
                        env={"MTA_HTTP_LISTEN": f"127.0.0.1:{free_port()}"})
        assert down.returncode == 1 and "unhealthy: http://127.0.0.1:" in down.stderr
        assert box.stop() == 0


def test_ctr_4_spool_volume_keeps_deferred_mail_across_a_restart(world: tuple[FakeDns, FakeMx]) -> None:
    dns_server, _ = world
    smart_host = loopback_address()
    smart_port = free_port(smart_host)
    env = {"MTA_NAMESERVERS": dns_server.host, "MTA_RELAYHOST": f"{smart_host}:{smart_port}",
           "MTA_RELAYHOST_TLS": "may"}
    with volume() as vol:
        with quick_start(env, vol) as (box, port):
            assert submit(port) == (250, "ok")
            box.wait_log("deferred")  # the smart host is not up yet
            [queued] = json.loads(box.exec("mta", "queue", "list", "--json").stdout)
            assert box.stop() == 0
            assert "mta[stopping]" in box.logs()
        # A new container on the same volume (as after an image upgrade) still has the message, also
        # with a read-only root file system and no /tmp (as deploy/kubernetes runs it) ...
        with quick_start(env, vol, extra_args=("--read-only", "--read-only-tmpfs=false")) as (box, port):
            [again] = json.loads(box.exec("mta", "queue", "list", "--json").stdout)
            assert again["id"] == queued["id"]
            assert again["recipients"][0]["attempts"] >= 1
            # ... and delivers it once the smart host answers.
            smart = FakeMx(smart_host, port=smart_port).start_in_thread()
            try:
                box.exec("mta", "queue", "flush")
                [got] = smart.wait_for_messages_blocking(1, timeout=15)
                assert got.rcpt_tos == ["user@example.test"]
            finally:
                smart.stop_thread()
            box.wait_log("delivered")
            assert box.stop() == 0


def test_ctr_3_readme_published_port_setting_admits_only_the_gateway(world: tuple[FakeDns, FakeMx]) -> None:
    """The README's bridge-network setting, checked on loopback.

    Behind a published port the client comes from the bridge's gateway (podman 10.88.0.1). With
    `--network host` a loopback address G stands in for the gateway, and the image's loopback-only
    default is narrowed to 127.0.0.1/32 so that G lies outside it, as 10.88.0.1 lies outside
    127.0.0.0/8. Then: without the README's setting G is refused; with it (its gateway replaced by
    G) G relays, while another address of the container network still cannot.
    """
    dns_server, mx = world
    [setting] = [w for w in readme_command("podman", "run", having="-p") if w.startswith("MTA_RELAY_NETWORKS=")]
    assert setting == "MTA_RELAY_NETWORKS=10.88.0.1/32"
    gateway = loopback_address()
    other = gateway.rsplit(".", 1)[0] + (".1" if not gateway.endswith(".1") else ".2")
    base = {"MTA_NAMESERVERS": dns_server.host}
    with quick_start({**base, "MTA_RELAY_NETWORKS": "127.0.0.1/32"}) as (box, port):
        code, text = submit(port, source=gateway)
        assert (code, text) == (554, "5.7.1 Relay access denied")
        assert box.stop() == 0
    readme_value = setting.split("=", 1)[1].replace("10.88.0.1", gateway)
    with quick_start({**base, "MTA_RELAY_NETWORKS": readme_value}) as (box, port):
        assert submit(port, source=gateway) == (250, "ok")
        assert submit(port, source=other)[0] == 554
        [got] = mx.wait_for_messages_blocking(1, timeout=15)
        assert got.rcpt_tos == ["user@example.test"]
        assert box.stop() == 0
