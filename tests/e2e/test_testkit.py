"""mta.testing as users get it (issue 16): the README example under plain pytest as a non-root user,
the API names, clean stops on failure, and how fast a world starts (KIT-1..4)."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.query
import pytest

import mta
from mta.testing.world import MX_ADDRESSES, World

ROOT = Path(mta.__file__).resolve().parent.parent
HELLO = b"Subject: hi\r\n\r\nhello\r\n"


def readme_example() -> str:
    """The first python block of the README's "Testing your own setup with mta" section, verbatim."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Testing your own setup with mta", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def _runnable_by(user: str, interpreter: str) -> bool:
    done = subprocess.run(["runuser", "-u", user, "--", interpreter, "-c", "pass"], capture_output=True, timeout=20)
    return done.returncode == 0


@pytest.fixture
def scratch() -> Iterator[Path]:
    # Not tmp_path: pytest's base folder is private to root, and the user under test must reach this one.
    path = Path(tempfile.mkdtemp(prefix="mta-kit-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.req("KIT-1", "KIT-2")
def test_readme_example_passes_under_plain_pytest_as_a_non_root_user(scratch: Path) -> None:
    """Done means (issue 16): the README file, written out as is, passes under plain `pytest`, no conftest,
    as a non-root user, with mta installed as a package (its `pytest11` entry point loads the plugin).

    The venv installs this checkout with `pip --no-deps --no-index` and takes mta's dependencies
    (mta[testing]'s among them) from the running interpreter's site-packages through a .pth file:
    a download-free stand-in for `pip install mta[testing]` that CI can run offline in seconds."""
    user = "nobody"
    interpreter = sys.executable
    if os.geteuid() == 0 and not _runnable_by(user, interpreter):
        # e.g. a pyenv interpreter under /root: use the system one of the same version instead.
        interpreter = shutil.which(f"python{sys.version_info.major}.{sys.version_info.minor}", path="/usr/bin") or ""
        if not interpreter or not _runnable_by(user, interpreter):
            pytest.skip(f"no Python {sys.version_info[:2]} that user {user} may run")
    src = scratch / "src"
    src.mkdir()
    shutil.copytree(ROOT / "mta", src / "mta", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    venv = scratch / "venv"
    subprocess.run([interpreter, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=30)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()"
                                "['purelib'])"], capture_output=True, text=True, check=True).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    done = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                           "--no-build-isolation", str(src)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "mta.testing.plugin" in next(site.glob("mta-*.dist-info/entry_points.txt")).read_text()

    home = scratch / "home"
    home.mkdir()
    (home / "test_my_relay.py").write_text(readme_example())
    cmd = [str(venv / "bin" / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_my_relay.py"]
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(home), "TMPDIR": str(home), "LANG": "C.UTF-8"}
    if os.geteuid() == 0:
        entry = pwd.getpwnam(user)
        shutil.chown(home, entry.pw_uid, entry.pw_gid)
        cmd = ["runuser", "-u", user, "--", "env", *(f"{k}={v}" for k, v in env.items()), *cmd]
    done = subprocess.run(cmd, cwd=home, capture_output=True, text=True, timeout=50, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "2 passed" in done.stdout


@pytest.mark.req("KIT-1")
def test_api_names_no_tls_null_mx_zone_and_ca_file(mta_world: World) -> None:
    plain = mta_world.mx_host("mx1.plain.test", cert=None)
    other = mta_world.mx_host("mx2.plain.test", cert="expired")
    assert {plain.address, other.address} <= set(MX_ADDRESSES) and plain.address != other.address
    mta_world.domain("plain.test", [(10, "mx1.plain.test")])
    mta_world.domain("nullmx.test", [(0, ".")])
    mta_world.dns.add("extra.plain.test", "TXT", '"hello world"')
    assert b"BEGIN CERTIFICATE" in mta_world.ca_file.read_bytes()
    ask = dns.message.make_query("extra.plain.test", "TXT")
    answer = dns.query.udp(ask, mta_world.dns.host, port=mta_world.dns.port, timeout=2)
    assert answer.answer[0][0].strings == (b"hello world",)
    assert ("extra.plain.test", "TXT") in mta_world.dns.queries

    relay = mta_world.relay({"delivery": {"retry_intervals": ["1h"]}})
    qid = relay.submit("alice@src.test", ["bob@plain.test"], HELLO)
    [msg] = plain.wait_for_messages(1, timeout=10)
    assert (msg.mail_from, msg.rcpt_tos, msg.tls_version, msg.sni) == ("alice@src.test", ["bob@plain.test"], None, None)
    assert msg.content.endswith(b"hello\r\n") and plain.messages == [msg]
    [session] = plain.sessions
    assert session.saw("MAIL") and not session.saw("STARTTLS")
    [ev] = relay.wait_event("delivered", queue_id=qid, timeout=15)
    assert ev["sts_mode"] is None and ev["tls"] == "none"

    bounced = relay.submit("alice@src.test", ["carol@nullmx.test"], HELLO)
    relay.wait_event("bounced", queue_id=bounced, timeout=15)
    assert not other.sessions
    assert all(item["id"] != qid for item in relay.queue())


STOP_PROBE = textwrap.dedent('''
    import json, os, socket
    from pathlib import Path

    import pytest

    PROBE = Path(os.environ["KIT_PROBE"])

    def test_1_fails_after_starting_everything(mta_world):
        mx = mta_world.mx_host("mx1.example.test")
        mta_world.domain("example.test", [(10, "mx1.example.test")])
        mta_world.sts("example.test", "enforce", ["mx1.example.test"])
        relay = mta_world.relay()
        pid = relay.proc.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        PROBE.write_text(json.dumps({"pids": [pid, *map(int, children)],
                                     "tcp": [[mx.address, mx.port], [mta_world.policy.address, mta_world.policy.port],
                                             [mta_world.dns.host, mta_world.dns.port]]}))
        assert False, "this test fails on purpose"

    def test_2_nothing_of_it_is_left():
        seen = json.loads(PROBE.read_text())
        for pid in seen["pids"]:  # the relay and its listener child: gone, and reaped
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        for host, port in seen["tcp"]:  # MX, policy host, DNS over TCP: nobody listens
            with pytest.raises(ConnectionRefusedError), socket.create_connection((host, port), timeout=2):
                pass
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(tuple(seen["tcp"][-1]))  # DNS over UDP: the port is free again
''')


@pytest.mark.req("KIT-3")
def test_everything_a_failing_test_started_is_stopped(tmp_path: Path) -> None:
    """Checked from a second test in the same pytest process: the world's threads must be stopped by
    the fixture itself, not by the process exiting."""
    (tmp_path / "test_probe.py").write_text(STOP_PROBE)
    # The plugin is named with -p and entry-point autoloading is off, so this runs the same whether or not
    # the installed package registers its pytest11 entry point (twice registered would be an error).
    env = dict(os.environ, KIT_PROBE=str(tmp_path / "probe.json"), PYTHONPATH=str(ROOT),
               PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "mta.testing.plugin", "-p", "no:cacheprovider",
                           "test_probe.py"], cwd=tmp_path, capture_output=True, text=True, timeout=50, env=env)
    assert "1 failed, 1 passed" in done.stdout, done.stdout[-3000:]
    assert "test_1_fails_after_starting_everything" in done.stdout.split("short test summary")[1]


@pytest.mark.req("KIT-4")
def test_a_world_starts_in_under_a_second(tmp_path: Path) -> None:
    timings = []
    for i in range(3):
        start = time.perf_counter()
        world = World(tmp_path / str(i))
        try:
            world.mx_host("mx1.example.test")
            world.domain("example.test", [(10, "mx1.example.test")])
            world.sts("example.test", "enforce", ["mx1.example.test"])
            timings.append(time.perf_counter() - start)
        finally:
            world.close()
    print(f"world start (DNS, CA, policy host, 2 MX hosts, STS): {[round(t, 3) for t in timings]} s")
    assert min(timings) < 1.0, timings
