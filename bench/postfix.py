"""A private Postfix instance as the reference relay: own config, queue and data folders.

Rule: the instance touches nothing of the system's Postfix. It is started with
`postfix -c <its config_directory>`; its main.cf names its own queue_directory and
data_directory; master.cf has one SMTP listener on a loopback address and high port, and no
service is chrooted (the queue lives in a temporary folder without the chroot's copies of
/etc files). `inet_interfaces = loopback-only`, mydestination/relay_domains/relayhost empty.

Routing, and how it compares with mta (document this when quoting figures):
- Postfix resolves through the system resolver, which cannot see the benchmark's fake DNS, so
  every benchmark domain is routed with `transport_maps = inline:{ domain=smtp:[ip]:port }`:
  Postfix does no DNS lookup at all, while mta does MX + A lookups against the fake DNS (TTL
  300 s, cached by mta after the warm-up message). Any other domain goes to `error:` so the
  instance can never send anywhere else.
- TLS "secure" with `smtp_tls_secure_cert_match = <mx name>` and `smtp_tls_CAfile` = the test
  CA is what Postfix would do for a destination whose MX name is `<mx name>`; the verified-TLS
  and MTA-STS enforce cases use it. For MTA-STS, Postfix has no built-in support: a
  postfix-mta-sts-resolver socketmap would answer `secure match=<mx>` for an enforce domain,
  which is exactly this static setting, minus the socketmap round trip (so Postfix's figure is a
  best case for "Postfix + resolver with a warm cache").
- Queue files are fsync'ed by Postfix's cleanup before smtpd answers 250, as mta fsyncs before
  its 250: both submission rates are "accepted durably".
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import time
from pathlib import Path

POSTFIX = "/usr/sbin/postfix"
MASTER_SERVICES = """\
{listen} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
tlsproxy  unix  -       -       n       -       0       tlsproxy
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def available() -> str | None:
    """None when Postfix's binaries are installed, else what is missing."""
    for path in (POSTFIX, "/usr/sbin/smtp-source", "/usr/sbin/smtp-sink", "/usr/lib/postfix/sbin/master"):
        if not os.path.exists(path):
            return f"{path} is missing (apt-get install postfix)"
    try:
        pwd.getpwnam("postfix")
    except KeyError:
        return "no 'postfix' user (apt-get install postfix)"
    return None


def version() -> str:
    try:
        res = subprocess.run(["/usr/sbin/postconf", "-h", "-d", "mail_version"], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return res.stdout.strip() or "?"


class PostfixRelay:
    """One private Postfix; `tls` is "none", "may" or "secure" for the delivery leg."""

    def __init__(self, root: Path, listen: tuple[str, int], routes: dict[str, tuple[str, int]], *,
                 tls: str = "none", ca_file: str = "", cert_match: str = "mx.sink.test",
                 hostname: str = "postfix-relay.test", extra: dict[str, str] | None = None) -> None:
        self.root = root
        self.extra = dict(extra or {})  # further main.cf settings (e.g. smtp_tls_connection_reuse)
        self.listen = listen
        self.routes = routes
        self.tls = tls
        self.ca_file = ca_file
        self.cert_match = cert_match
        self.hostname = hostname
        self.etc = root / "etc"
        self.queue = root / "queue"
        self.data = root / "data"
        self.maillog = root / "maillog"

    def main_cf(self) -> str:
        transport = ", ".join(f"{d}=smtp:[{h}]:{p}" for d, (h, p) in sorted(self.routes.items()))
        lines = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue),
            "data_directory": str(self.data),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "maillog_file": str(self.maillog),
            "myhostname": self.hostname,
            "mydomain": "relay.test",
            "myorigin": "$myhostname",
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "mydestination": "",
            "relay_domains": "",
            "relayhost": "",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "transport_maps": f"inline:{{ {transport} }}",
            # Safety: a domain the benchmark did not route can never leave this machine.
            "default_transport": "error:not a benchmark destination",
            "smtp_host_lookup": "native",
            "biff": "no",
            "append_dot_mydomain": "no",
            "smtpd_banner": "$myhostname ESMTP",
            "smtp_tls_security_level": self.tls,
            "smtp_tls_CAfile": self.ca_file,
            "smtp_tls_secure_cert_match": self.cert_match,
            "smtp_tls_session_cache_database": f"btree:{self.data}/smtp_scache",
            "smtp_tls_loglevel": "1",
            "smtpd_tls_security_level": "none",
            "message_size_limit": "26214400",
        }
        if not self.ca_file:
            del lines["smtp_tls_CAfile"]
        lines.update(self.extra)
        return "".join(f"{k} = {v}\n" for k, v in lines.items())

    def write_config(self) -> None:
        for d in (self.root, self.etc, self.queue, self.data):
            d.mkdir(parents=True, exist_ok=True)
        # The daemons run as `postfix` and must reach their folders: a mkdtemp() folder above
        # us is 0700, so give every ancestor lacking it the search (x) bit, nothing more.
        self.root.chmod(0o755)
        for parent in self.root.parents:
            mode = parent.stat().st_mode
            if not mode & 0o001:
                with contextlib.suppress(OSError):
                    parent.chmod(mode | 0o011)
        pw = pwd.getpwnam("postfix")
        os.chown(self.data, pw.pw_uid, pw.pw_gid)
        (self.etc / "main.cf").write_text(self.main_cf())
        host, port = self.listen
        (self.etc / "master.cf").write_text(MASTER_SERVICES.format(listen=f"{host}:{port}"))
        self.maillog.touch()

    def _postfix(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([POSTFIX, "-c", str(self.etc), *args], capture_output=True, text=True,
                              timeout=timeout)

    def start(self, timeout: float = 30) -> PostfixRelay:
        self.write_config()
        res = self._postfix("start")
        if res.returncode != 0:
            raise RuntimeError(f"postfix start failed: {res.stdout}{res.stderr}\n{self.log_tail()}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.master_pid() is not None and _port_open(*self.listen):
                return self
            time.sleep(0.1)
        raise RuntimeError(f"postfix did not listen on {self.listen}:\n{self.log_tail()}")

    def master_pid(self) -> int | None:
        try:
            pid = int((self.queue / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if os.path.exists(f"/proc/{pid}") else None

    def queue_empty(self) -> bool:
        """No message left in incoming/active/deferred (maildrop is unused)."""
        for sub in ("incoming", "active", "deferred", "hold"):
            folder = self.queue / sub
            if folder.exists() and any(f.is_file() for f in folder.rglob("*")):
                return False
        return True

    def stop(self, timeout: float = 30) -> None:
        pid = self.master_pid()
        if pid is None:
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._postfix("stop", timeout=timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
            time.sleep(0.1)
        if os.path.exists(f"/proc/{pid}"):
            with contextlib.suppress(OSError):
                os.kill(pid, 9)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.maillog.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def count_log(self, needle: str) -> int:
        try:
            with open(self.maillog, errors="replace") as f:
                return sum(1 for line in f if needle in line)
        except OSError:
            return 0

    def grep_log(self, needles: tuple[str, ...], limit: int) -> list[str]:
        """Up to `limit` log lines holding one of `needles` (not the routine post-CONNECT ones)."""
        out: list[str] = []
        try:
            with open(self.maillog, errors="replace") as f:
                for line in f:
                    if any(n in line for n in needles) and "after CONNECT" not in line:
                        out.append(line.strip())
                        if len(out) >= limit:
                            break
        except OSError:
            pass
        return out

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def _port_open(host: str, port: int) -> bool:
    import socket

    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False
