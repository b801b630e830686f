"""An authoritative test DNS server on loopback (UDP and TCP on one port), driven by a mutable zone.

Rule: every answer comes from `Zone`, which tests change while the server runs; every query is
logged (observable O-DNS). The server is authoritative for every name: a name exists when a
record exists at it or below it (an empty non-terminal answers NODATA); otherwise NXDOMAIN. Both
negatives carry a SOA so resolvers can work out the negative TTL (RFC 2308).

It runs on plain sockets in background threads, so in-process asyncio tests and `mta serve`
subprocesses can both use it:

    with FakeDns() as dns_server:                      # 127.0.0.53, ephemeral port
        dns_server.zone.add("example.test", "MX", "10 mx1.example.test.")
        dns_server.zone.add("mx1.example.test", "A", "127.0.0.5")
        ... Resolver([dns_server.host], port=dns_server.port) ...
        assert ("example.test", "MX") in dns_server.queries

Records get TTL 0 unless given (so a resolver under test asks again every time and O-DNS shows
every lookup); the SOA minimum (negative TTL) is 0 too. Records of one RRset are sent in the order
they were added.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
import threading
from dataclasses import dataclass, field
from types import TracebackType
from typing import NamedTuple

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.rrset

MAX_CHAIN = 8  # CNAME hops chased inside one answer
TCP_IDLE = 10.0  # seconds a TCP client may stay silent before we hang up


def _name(name: str | dns.name.Name) -> dns.name.Name:
    return name if isinstance(name, dns.name.Name) else dns.name.from_text(name, origin=dns.name.root)


def _type(rdtype: str | None) -> dns.rdatatype.RdataType | None:
    return None if rdtype is None else dns.rdatatype.from_text(rdtype)


class Query(NamedTuple):
    """One question the server saw: name (lower-case, no final dot), type ("MX"), transport."""

    name: str
    type: str
    transport: str  # "udp" | "tcp"


@dataclass
class Reply:
    """What the zone says for one question."""

    rcode: dns.rcode.Rcode = dns.rcode.NOERROR
    answer: list[dns.rrset.RRset] = field(default_factory=list)
    authority: list[dns.rrset.RRset] = field(default_factory=list)
    drop: bool = False  # send nothing (the client times out)
    huge: bool = False  # over UDP: empty answer with TC set (the client must retry over TCP)


class Zone:
    """Mutable, thread-safe zone data. Names may be U-labels (stored as A-labels), case-insensitive."""

    def __init__(self, default_ttl: int = 0, negative_ttl: int = 0) -> None:
        self.default_ttl = default_ttl
        self.negative_ttl = negative_ttl
        self._lock = threading.Lock()
        self._data: dict[dns.name.Name, dict[dns.rdatatype.RdataType, dns.rdataset.Rdataset]] = {}
        self._rcodes: dict[tuple[dns.name.Name, dns.rdatatype.RdataType | None], dns.rcode.Rcode] = {}
        self._drops: set[tuple[dns.name.Name, dns.rdatatype.RdataType | None]] = set()
        self._huge: set[dns.name.Name] = set()

    def add(self, name: str, rdtype: str, value: str, ttl: int | None = None) -> None:
        """Add one record, e.g. add("example.test", "MX", "10 mx1.example.test.").

        `value` is zone-file RDATA text; relative names in it are taken as absolute. TXT values use
        zone-file quoting, so '"v=STSv1; i" "d=abc"' is one record of two character-strings.
        """
        owner, code = _name(name), _type(rdtype)
        assert code is not None
        rdata = dns.rdata.from_text(dns.rdataclass.IN, code, value, origin=dns.name.root, relativize=False)
        with self._lock:
            node = self._data.setdefault(owner, {})
            rdataset = node.setdefault(code, dns.rdataset.Rdataset(dns.rdataclass.IN, code))
            rdataset.add(rdata, self.default_ttl if ttl is None else ttl)

    def remove(self, name: str, rdtype: str | None = None, value: str | None = None) -> None:
        """Remove one record (`value`), a whole RRset (`rdtype`) or every record at `name`."""
        owner, code = _name(name), _type(rdtype)
        with self._lock:
            node = self._data.get(owner, {})
            if code is None:
                node.clear()
            elif value is None:
                node.pop(code, None)
            elif code in node:
                gone = dns.rdata.from_text(dns.rdataclass.IN, code, value, origin=dns.name.root, relativize=False)
                node[code].discard(gone)  # type: ignore[no-untyped-call]
                if not node[code]:
                    del node[code]
            if not node:
                self._data.pop(owner, None)

    def set_rcode(self, name: str, rcode: str | None, rdtype: str | None = None) -> None:
        """Answer `name` (only `rdtype` questions if given) with `rcode` ("SERVFAIL", "REFUSED"); None undoes."""
        key = (_name(name), _type(rdtype))
        with self._lock:
            if rcode is None:
                self._rcodes.pop(key, None)
            else:
                self._rcodes[key] = dns.rcode.from_text(rcode)

    def set_drop(self, name: str, drop: bool = True, rdtype: str | None = None) -> None:
        """Never answer questions for `name` (only `rdtype` if given): the client times out."""
        key = (_name(name), _type(rdtype))
        with self._lock:
            if drop:
                self._drops.add(key)
            else:
                self._drops.discard(key)

    def set_huge(self, name: str, huge: bool = True) -> None:
        """Answers for `name` over UDP are truncated (TC bit, no records); TCP gets the full answer."""
        with self._lock:
            if huge:
                self._huge.add(_name(name))
            else:
                self._huge.discard(_name(name))

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._rcodes.clear()
            self._drops.clear()
            self._huge.clear()

    def reply(self, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> Reply:
        """The authoritative answer for one question (CNAMEs in the zone chased into the same answer)."""
        with self._lock:
            if (qname, None) in self._drops or (qname, rdtype) in self._drops:
                return Reply(drop=True)
            rcode = self._rcodes.get((qname, rdtype), self._rcodes.get((qname, None)))
            if rcode is not None:
                return Reply(rcode=rcode)
            reply = Reply(huge=qname in self._huge)
            current, seen = qname, {qname}
            for _ in range(MAX_CHAIN):
                node = self._data.get(current, {})
                if rdtype in node:
                    reply.answer.append(self._rrset(current, node[rdtype]))
                    return reply
                cname = node.get(dns.rdatatype.CNAME)
                if cname is None or rdtype == dns.rdatatype.CNAME:
                    break
                reply.answer.append(self._rrset(current, cname))
                current = next(iter(cname)).target
                if current in seen:  # a CNAME loop: stop and let the client notice
                    return reply
                seen.add(current)
            if not self._exists(current):
                reply.rcode = dns.rcode.NXDOMAIN
            reply.authority.append(self._soa(current))
            return reply

    @staticmethod
    def _rrset(owner: dns.name.Name, rdataset: dns.rdataset.Rdataset) -> dns.rrset.RRset:
        rrset = dns.rrset.RRset(owner, rdataset.rdclass, rdataset.rdtype)
        rrset.update(rdataset)  # type: ignore[no-untyped-call]
        return rrset

    def _exists(self, name: dns.name.Name) -> bool:
        return any(owner.is_subdomain(name) for owner in self._data)

    def _soa(self, name: dns.name.Name) -> dns.rrset.RRset:
        # Owned by the top-level label: always an ancestor of the question, as RFC 2308 expects.
        apex = name.split(2)[1] if len(name) > 1 else name
        rdata = dns.rdata.from_text(
            dns.rdataclass.IN, dns.rdatatype.SOA,
            f"ns.fake-dns.invalid. hostmaster.fake-dns.invalid. 1 3600 600 86400 {self.negative_ttl}",
            relativize=False)
        rrset = dns.rrset.RRset(apex, dns.rdataclass.IN, dns.rdatatype.SOA)
        rrset.add(rdata, self.negative_ttl)
        return rrset


class FakeDns:
    """The server: UDP and TCP on `host`:`port` (port 0 picks a free one, the same for both)."""

    def __init__(self, zone: Zone | None = None, host: str = "127.0.0.53", port: int = 0) -> None:
        self.zone = zone if zone is not None else Zone()
        self.host = host
        self.port = port
        self._log: list[Query] = []
        self._log_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._conns: set[socket.socket] = set()
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        #: exceptions raised while answering (a bug in this server); each such query got SERVFAIL
        self.errors: list[BaseException] = []

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> FakeDns:
        self._udp, self._tcp = self._bind()
        self.port = int(self._udp.getsockname()[1])
        self._stop.clear()
        for target in (self._serve_udp, self._serve_tcp):
            thread = threading.Thread(target=target, name=f"fake-dns-{target.__name__}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._log_lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(timeout=2.0)
        self._threads.clear()
        for sock in (self._udp, self._tcp):
            if sock is not None:
                sock.close()
        self._udp = self._tcp = None

    def __enter__(self) -> FakeDns:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def _bind(self) -> tuple[socket.socket, socket.socket]:
        for _ in range(50):  # bounded: a UDP port whose TCP twin is taken is simply skipped
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind((self.host, self.port))
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                tcp.bind((self.host, udp.getsockname()[1]))
            except OSError as exc:
                udp.close()
                tcp.close()
                if exc.errno != errno.EADDRINUSE or self.port:
                    raise
                continue
            tcp.listen(16)
            udp.settimeout(0.05)
            tcp.settimeout(0.05)
            return udp, tcp
        raise OSError(f"no free port pair on {self.host}")

    # -- zone shortcuts (mta.testing's `mta_world.dns` is "the zone" to users, KIT-1) ---------

    def add(self, name: str, rdtype: str, value: str, ttl: int | None = None) -> None:
        """`zone.add`: e.g. dns.add("example.test", "TXT", '"v=spf1 -all"')."""
        self.zone.add(name, rdtype, value, ttl)

    def remove(self, name: str, rdtype: str | None = None, value: str | None = None) -> None:
        """`zone.remove`."""
        self.zone.remove(name, rdtype, value)

    # -- query log (O-DNS) -------------------------------------------------------------------

    @property
    def query_log(self) -> list[Query]:
        """Every question seen, oldest first, with its transport."""
        with self._log_lock:
            return list(self._log)

    @property
    def queries(self) -> list[tuple[str, str]]:
        """Every question seen as (name, type), e.g. ("_mta-sts.example.test", "TXT")."""
        return [(q.name, q.type) for q in self.query_log]

    def count(self, name: str, rdtype: str | None = None) -> int:
        """How many times `name` (and `rdtype`, if given) was asked."""
        wanted = _name(name).to_text(omit_final_dot=True).lower()
        return sum(1 for q in self.query_log if q.name == wanted and (rdtype is None or q.type == rdtype.upper()))

    def clear_log(self) -> None:
        with self._log_lock:
            self._log.clear()

    # -- serving -----------------------------------------------------------------------------

    def _serve_udp(self) -> None:
        assert self._udp is not None
        sock = self._udp
        while not self._stop.is_set():
            try:
                wire, peer = sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            out = self._respond(wire, "udp")
            if out is not None:
                with contextlib.suppress(OSError):
                    sock.sendto(out, peer)

    def _serve_tcp(self) -> None:
        assert self._tcp is not None
        while not self._stop.is_set():
            try:
                conn, _peer = self._tcp.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._serve_conn, args=(conn,), name="fake-dns-tcp-conn", daemon=True)
            thread.start()

    def _serve_conn(self, conn: socket.socket) -> None:
        with self._log_lock:
            self._conns.add(conn)
        conn.settimeout(TCP_IDLE)
        try:
            while not self._stop.is_set():
                header = _recv_exact(conn, 2)
                if header is None:
                    return
                wire = _recv_exact(conn, struct.unpack("!H", header)[0])
                if wire is None:
                    return
                out = self._respond(wire, "tcp")
                if out is not None:
                    conn.sendall(struct.pack("!H", len(out)) + out)
        except OSError:
            return
        finally:
            with self._log_lock:
                self._conns.discard(conn)
            conn.close()

    def _respond(self, wire: bytes, transport: str) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None  # not DNS: a real server would drop it too
        try:
            return self._answer(query, transport)
        except Exception as exc:  # keep serving; the test can inspect .errors
            self.errors.append(exc)
            failed = dns.message.make_response(query)
            failed.set_rcode(dns.rcode.SERVFAIL)
            return failed.to_wire()

    def _answer(self, query: dns.message.Message, transport: str) -> bytes | None:
        response = dns.message.make_response(query)
        if query.opcode() != dns.opcode.QUERY or len(query.question) != 1:
            response.set_rcode(dns.rcode.NOTIMP if query.opcode() != dns.opcode.QUERY else dns.rcode.FORMERR)
            return response.to_wire()
        question = query.question[0]
        with self._log_lock:
            self._log.append(Query(question.name.to_text(omit_final_dot=True).lower(),
                                   dns.rdatatype.to_text(question.rdtype), transport))
        reply = self.zone.reply(question.name, question.rdtype)
        if reply.drop:
            return None
        response.flags |= dns.flags.AA
        response.set_rcode(reply.rcode)
        if transport == "udp" and reply.huge:
            response.flags |= dns.flags.TC
            return response.to_wire()
        response.answer.extend(reply.answer)
        response.authority.extend(reply.authority)
        limit = 65535 if transport == "tcp" else (query.payload if query.edns >= 0 else 512)
        try:
            # Records go out in the order they were added (no round-robin shuffle), so tests of
            # "addresses tried in resolver order" (SMTP-11) are deterministic.
            return response.to_wire(max_size=limit, want_shuffle=False)
        except dns.exception.TooBig:
            # Does not fit the client's UDP size: send the header only with TC, as real servers do.
            truncated = dns.message.make_response(query)
            truncated.flags |= dns.flags.AA | dns.flags.TC
            truncated.set_rcode(reply.rcode)
            return truncated.to_wire()


def _recv_exact(conn: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data
