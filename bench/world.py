"""The benchmark's little internet on loopback: test CA, DNS, MTA-STS policy host and two sinks.

Rule: everything listens on 127.0.0.x and lives as long as one `World`; relays come and go per
run. Names and addresses:

    plain.test   MX 10 mx.plain.test   mx.plain.test A 127.0.0.30  (Postfix smtp-sink, no TLS)
    tls.test     MX 10 mx.tls.test     mx.tls.test   A 127.0.0.31  (bench/sink.py, STARTTLS,
    sts.test     MX 10 mx.tls.test                                  certificate for mx.tls.test
    nosts.test   MX 10 mx.tls.test                                  from the test CA)
    _mta-sts.sts.test TXT "v=STSv1; id=bench1"; mta-sts.sts.test A 127.0.0.32 (HTTPS policy host)
    policy of sts.test: mode enforce, mx mx.tls.test; nosts.test has no policy (NXDOMAIN TXT).

Both sinks listen on the same port number (mta has one `[delivery] smtp_port`). Records carry a
TTL of 300 s so mta's resolver cache holds them after the warm-up message, like a production
recursive resolver would; Postfix never asks DNS (see postfix.py).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support.fake_dns import FakeDns, Zone  # noqa: E402
from tests.support.pki import TestPki  # noqa: E402
from tests.support.policy_server import PolicyServer  # noqa: E402

PLAIN_SINK_IP = "127.0.0.30"
TLS_SINK_IP = "127.0.0.31"
POLICY_IP = "127.0.0.32"
DNS_IP = "127.0.0.53"
TLS_MX = "mx.tls.test"
PLAIN_MX = "mx.plain.test"
STS_POLICY = f"version: STSv1\nmode: enforce\nmx: {TLS_MX}\nmax_age: 86400\n"
TTL = 300
_RECORD = re.compile(rb"mesg=(\d+)(?: tls=(\d+))?(?:.*?last=([\d.]+))?")


def free_port_on(*hosts: str) -> int:
    """A TCP port free on every one of `hosts` (bounded search)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind((hosts[0], 0))
            port = int(s.getsockname()[1])
        ok = True
        for host in hosts[1:]:
            with socket.socket() as s:
                try:
                    s.bind((host, port))
                except OSError:
                    ok = False
                    break
        if ok:
            return port
    raise OSError(f"no common free port on {hosts}")


def wait_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port}")


class SinkWatch:
    """Runs a sink process and follows its `mesg=N ...\\r` progress records from stdout."""

    def __init__(self, name: str, cmd: list[str], host: str, port: int) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.count = 0
        self.tls = 0
        self.last = 0.0  # time.monotonic() of the latest message
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self._thread = threading.Thread(target=self._read, name=f"sink-{name}", daemon=True)
        self._thread.start()
        wait_port(host, port)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        pending = b""
        while True:
            chunk = os.read(fd, 65536)  # always drained: a full pipe would stall smtp-sink
            if not chunk:
                return
            now = time.monotonic()
            pending += chunk
            *records, pending = pending.split(b"\r")
            for rec in reversed(records):
                m = _RECORD.search(rec)
                if m is None:
                    continue
                with self._cond:
                    count = int(m.group(1))
                    if count > self.count:
                        self.count = count
                        self.tls = int(m.group(2) or 0)
                        self.last = float(m.group(3)) if m.group(3) else now
                        self._cond.notify_all()
                break

    def wait_for(self, count: int, timeout: float) -> bool:
        """True once `count` messages arrived; False after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.count < count:
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    return False
                self._cond.wait(min(left, 1.0))
        return True

    def snapshot(self) -> tuple[int, int, float]:
        with self._cond:
            return self.count, self.tls, self.last

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._thread.join(5)


class World:
    """Test CA + fake DNS + policy host + both sinks, under `workdir`."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.pki = TestPki(workdir / "pki")
        for p in [self.pki.folder, *self.pki.folder.iterdir()]:
            p.chmod(0o755 if p.is_dir() else 0o644)  # Postfix's smtp runs as `postfix`
        self.tls_leaf = self.pki.leaf(TLS_MX)
        self.sink_port = free_port_on(PLAIN_SINK_IP, TLS_SINK_IP)
        self.dns = FakeDns(Zone(default_ttl=TTL, negative_ttl=TTL), host=DNS_IP)
        self.policy = PolicyServer(self.pki, address=POLICY_IP)
        self.plain_sink: SinkWatch | None = None
        self.tls_sink: SinkWatch | None = None

    def start(self) -> World:
        z = self.dns.zone
        z.add("plain.test", "MX", f"10 {PLAIN_MX}.")
        z.add(PLAIN_MX, "A", PLAIN_SINK_IP)
        for domain in ("tls.test", "sts.test", "nosts.test"):
            z.add(domain, "MX", f"10 {TLS_MX}.")
        z.add(TLS_MX, "A", TLS_SINK_IP)
        z.add("_mta-sts.sts.test", "TXT", '"v=STSv1; id=bench1"')
        z.add("mta-sts.sts.test", "A", POLICY_IP)
        self.dns.start()
        self.policy.policy("sts.test", STS_POLICY)
        self.policy.start_in_thread()
        self.plain_sink = SinkWatch(
            "smtp-sink", ["/usr/sbin/smtp-sink", "-u", "nobody", "-c", "-m", "1024", "-h", PLAIN_MX,
                          f"{PLAIN_SINK_IP}:{self.sink_port}", "1024"], PLAIN_SINK_IP, self.sink_port)
        self.tls_sink = SinkWatch(
            "tls-sink", [sys.executable, str(Path(__file__).with_name("sink.py")), "--listen",
                         f"{TLS_SINK_IP}:{self.sink_port}", "--cert", str(self.tls_leaf.cert_path),
                         "--key", str(self.tls_leaf.key_path), "--name", TLS_MX], TLS_SINK_IP, self.sink_port)
        return self

    def sink(self, tls: bool) -> SinkWatch:
        sink = self.tls_sink if tls else self.plain_sink
        assert sink is not None
        return sink

    def stop(self) -> None:
        for sink in (self.plain_sink, self.tls_sink):
            if sink is not None:
                sink.stop()
        self.policy.stop_thread()
        self.dns.stop()

    def __enter__(self) -> World:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
