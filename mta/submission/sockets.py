"""Listening sockets shared by several submission processes (`[submission] processes`, PERF-5).

Rule: with N > 1 the parent binds every listen address N times with SO_REUSEPORT before it forks,
and child i serves the i-th socket of each address; the kernel spreads new connections over the N
sockets (a hash of the client's address and port). SO_REUSEPORT lets ANY later socket of the same
user join such a group, so a second `mta serve` (another spool, same port) would silently take a
share of the mail. Two guards keep the port ours alone:
- before binding, a plain bind (SO_REUSEADDR only) of the address must succeed: it fails while
  anything listens there, an earlier relay's reuse-port group included;
- after binding, the kernel's table of listening sockets (/proc/net/tcp, tcp6) must show no
  socket on that port and an overlapping address that is not one of ours: this catches two relays
  that passed the first check at the same moment (both then refuse to start).
With N = 1 none of this runs: the single child binds its own sockets without SO_REUSEPORT, as before.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import sys
import time
from collections.abc import Iterable

from mta.config import SubmissionConfig, parse_hostport
from mta.errors import MtaError

BACKLOG = 1024  # as the listener's own (mta.submission.listener._BACKLOG)
_LISTEN_STATE = "0A"  # TCP_LISTEN in /proc/net/tcp
_RETRY_SECONDS = 5.0  # a killed relay's children may hold the port for a moment (PDEATHSIG)


class ListenError(MtaError):
    """A listen address cannot be bound (in use, not ours, not local)."""


def configured_addresses(cfg: SubmissionConfig) -> list[tuple[str, int]]:
    """Every listen address in the order mta.submission.listener.Listeners.start uses."""
    return [parse_hostport(item) for item in (*cfg.listen, *cfg.implicit_tls_listen)]


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET


def _socket(host: str, reuse_port: bool) -> socket.socket:
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as asyncio's create_server
    return sock


def _probe(host: str, port: int) -> int:
    """Bind without SO_REUSEPORT (fails while anything listens there); returns the port (0 -> chosen)."""
    with _socket(host, reuse_port=False) as sock:
        sock.bind((host, port))
        return int(sock.getsockname()[1])


def parse_listeners(text: str, v6: bool) -> list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int, int]]:
    """(address, port, inode) of every listening socket in one /proc/net/tcp or tcp6 text."""
    out = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10 or fields[3] != _LISTEN_STATE:
            continue
        addr_hex, port_hex = fields[1].split(":")
        raw = bytes.fromhex(addr_hex)
        if sys.byteorder == "little":  # the kernel prints each 32-bit word in host byte order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
        addr = ipaddress.IPv6Address(raw) if v6 else ipaddress.IPv4Address(raw)
        out.append((addr, int(port_hex, 16), int(fields[9])))
    return out


def _overlaps(a: ipaddress.IPv4Address | ipaddress.IPv6Address,
              b: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Could a connection for one of these addresses reach a socket bound to the other?"""
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped:
        a = a.ipv4_mapped
    if isinstance(b, ipaddress.IPv6Address) and b.ipv4_mapped:
        b = b.ipv4_mapped
    return a == b or a.is_unspecified or b.is_unspecified  # conservative across families


def foreign_listeners(host: str, port: int, ours: Iterable[int], tables: Iterable[tuple[str, bool]]) -> int:
    """How many listening sockets on host:port (or an overlapping address) are not in `ours`."""
    mine = set(ours)
    addr = ipaddress.ip_address(host)
    return sum(1 for text, v6 in tables for other, p, inode in parse_listeners(text, v6)
               if p == port and inode not in mine and _overlaps(addr, other))


def _proc_tables() -> list[tuple[str, bool]]:
    out = []
    for name, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        try:
            with open(name) as f:
                out.append((f.read(), v6))
        except OSError:  # no IPv6 in this kernel: nothing can listen there either
            continue
    return out


def bind_shared(cfg: SubmissionConfig, count: int) -> list[list[socket.socket]]:
    """`count` listening sockets per configured address, all SO_REUSEPORT, as [child][address]."""
    if not hasattr(socket, "SO_REUSEPORT"):
        raise ListenError("submission.processes > 1 needs SO_REUSEPORT, which this system lacks")
    per_child: list[list[socket.socket]] = [[] for _ in range(count)]
    try:
        for host, port in configured_addresses(cfg):
            port = _probe_with_retry(host, port)
            group = []
            for i in range(count):
                sock = _socket(host, reuse_port=True)
                per_child[i].append(sock)
                sock.bind((host, port))
                sock.listen(BACKLOG)
                group.append(os.fstat(sock.fileno()).st_ino)
            if foreign_listeners(host, port, group, _proc_tables()):
                raise ListenError(f"cannot listen: {host}:{port}: another process listens there too "
                                  "(SO_REUSEPORT group not ours)")
    except OSError as exc:
        _close(per_child)
        raise ListenError(f"cannot listen: {exc.strerror or exc}") from None
    except ListenError:
        _close(per_child)
        raise
    return per_child


def _probe_with_retry(host: str, port: int) -> int:
    deadline = time.monotonic() + _RETRY_SECONDS
    while True:
        try:
            return _probe(host, port)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _close(per_child: list[list[socket.socket]]) -> None:
    for socks in per_child:
        for sock in socks:
            sock.close()
