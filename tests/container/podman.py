"""podman for the container tests: the test's own containers.conf, everything removed by id.

`README_RUN` etc. are the README's "Container" commands as argument lists, so the tests run what
the README says rather than a copy of it.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import secrets
import shlex
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONF = Path(__file__).with_name("containers.conf")
IMAGE = os.environ.get("MTA_CONTAINER_IMAGE", "")


def readme_commands() -> list[list[str]]:
    """Every shell command in the README's "### Container" section (continuations joined)."""
    text = (ROOT / "README.md").read_text()
    section = text.split("### Container\n", 1)[1].split("\n## ", 1)[0]
    out = []
    for block in re.findall(r"```sh\n(.*?)```", section, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                out.append(words)
    return out


def readme_command(*prefix: str, having: str = "") -> list[str]:
    """The README command starting with `prefix` (and containing the word `having`, if given)."""
    found = [c for c in readme_commands() if c[: len(prefix)] == list(prefix) and (not having or having in c)]
    assert len(found) == 1, f"README: expected one {' '.join(prefix)} {having} command, found {found}"
    return found[0]


def podman(*args: str, check: bool = True, timeout: float = 60,
           stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, CONTAINERS_CONF=str(CONF))
    r = subprocess.run(["podman", *args], env=env, capture_output=True, text=True, timeout=timeout, input=stdin)
    if check and r.returncode != 0:
        raise AssertionError(f"podman {shlex.join(args)}: exit {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def loopback_address() -> str:
    """A random 127.x.y.z (not 127.0.0.x), so parallel runs and other tests do not collide."""
    return f"127.{random.randint(100, 199)}.{random.randint(1, 254)}.{random.randint(1, 254)}"


class Container:
    def __init__(self, cid: str) -> None:
        self.id = cid

    def exec(self, *cmd: str, check: bool = True, env: dict[str, str] | None = None,
             stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        flags = [f"--env={k}={v}" for k, v in (env or {}).items()] + (["--interactive"] if stdin is not None else [])
        return podman("exec", *flags, self.id, *cmd, check=check, stdin=stdin)

    def logs(self) -> str:
        r = podman("logs", self.id, check=False)
        return r.stdout + r.stderr

    def inspect(self, fmt: str) -> str:
        return podman("inspect", "--format", fmt, self.id).stdout.strip()

    def wait_log(self, needle: str, timeout: float = 15) -> str:
        deadline = time.monotonic() + timeout
        while True:
            logs = self.logs()
            if needle in logs:
                return logs
            if time.monotonic() > deadline:
                raise AssertionError(f"container log never showed {needle!r}:\n{logs[-3000:]}")
            time.sleep(0.2)

    def stop(self) -> int:
        """`podman stop` (SIGTERM, the image's STOPSIGNAL); returns the container's exit code."""
        t0 = time.monotonic()
        podman("stop", "--time", "25", self.id)
        code = int(self.inspect("{{.State.ExitCode}}"))
        if code != 0:  # shown by pytest with the failing assertion
            print(f"podman stop took {time.monotonic() - t0:.1f} s, exit {code}; log:\n{self.logs()[-5000:]}")
        return code


@contextlib.contextmanager
def container(run_args: list[str], listen: tuple[str, int] | None = None) -> Iterator[Container]:
    """`podman create` + `start` (so the id is known even when start fails), removed by id at the end.

    `run_args` is a README `podman run` command's arguments after `run`, minus `-d`/`--name`.
    With `listen`, waits until the relay accepts connections there.
    """
    cid = podman("create", *run_args).stdout.strip().splitlines()[-1]
    box = Container(cid)
    try:
        podman("start", cid)
        if listen:
            _wait_port(box, *listen)
        yield box
    finally:
        podman("rm", "--force", "--volumes", "--time", "2", cid, check=False)


def _wait_port(box: Container, host: str, port: int, timeout: float = 20) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        if time.monotonic() > deadline or box.inspect("{{.State.Running}}") != "true":
            raise AssertionError(f"relay in the container never listened on {host}:{port}:\n{box.logs()[-3000:]}")
        time.sleep(0.1)


@contextlib.contextmanager
def volume() -> Iterator[str]:
    name = f"mta-test-spool-{secrets.token_hex(4)}"
    podman("volume", "create", name)
    try:
        yield name
    finally:
        podman("volume", "rm", "--force", name, check=False)


def run_args(readme_run: list[str], *, volume_name: str, port: int, http_port: int,
             extra_env: dict[str, str], extra_args: tuple[str, ...] = ()) -> list[str]:
    """The README's `podman run ...` as `podman create` arguments for a test.

    Changed, and only these: no `-d`/`--name` (the test works by id), the volume name, the ports
    in MTA_LISTEN and MTA_HTTP_LISTEN (2525 and 8025 may be taken on a shared machine), the image
    name, the health timer off (no systemd here; `podman healthcheck run` runs the check), plus
    the test's own variables and `extra_args`.
    """
    assert readme_run[:2] == ["podman", "run"], readme_run
    args = list(readme_run[2:])
    image = args.pop()
    assert image == "mta", f"README runs image {image!r}"
    out: list[str] = []
    it = iter(args)
    for a in it:
        if a == "-d":
            continue
        if a == "--name":
            next(it)
            continue
        if a == "-v":
            _, dst = next(it).split(":", 1)
            out += ["-v", f"{volume_name}:{dst}"]
            continue
        if a == "-e":
            value = next(it)
            if value.startswith("MTA_LISTEN="):
                value = re.sub(r":2525$", f":{port}", value)
            if value.startswith("MTA_HTTP_LISTEN="):
                value = re.sub(r":8025$", f":{http_port}", value)
            out += ["-e", value]
            continue
        out.append(a)
    for k, v in extra_env.items():
        out += ["-e", f"{k}={v}"]
    return [*out, *extra_args, "--health-interval", "disable", IMAGE]
