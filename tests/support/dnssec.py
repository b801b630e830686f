"""DNSSEC for the test DNS server: zones signed on the fly, and a real validating resolver (unbound).

`SignedZone` is a `fake_dns.Zone` in which some apexes are signed (ECDSA P-256, one key per apex
that is both KSK and ZSK). Records are added as usual; at answer time every RRset inside a signed
apex goes out with its RRSIG, negative answers carry the apex SOA and the apex's NSEC chain (all of
it: the zones are tiny, and a validator picks the proofs it needs), and the apex answers DNSKEY.
Signatures are made lazily whenever the zone changed since the last answer. Per RRset a test can
make the signature expired, missing or wrong (`break_rrset`), which a validator must call bogus.

`Unbound` runs Debian's `unbound` as our own process on a loopback address with a temp config:
one stub-zone for `test.` pointing at the fake DNS server (`do-not-query-localhost: no`), the
trust anchors of the signed apexes, and no root anchor, so names outside a signed apex are
insecure. This is the "validating resolver on loopback" the relay's `[dns] dnssec = true` expects.

    zone = SignedZone()
    with FakeDns(zone=zone) as fake:
        anchor = zone.sign("dane.test")
        zone.add("dane.test", "MX", "10 mx1.dane.test.")
        with Unbound(fake, [anchor], tmp_path) as resolver:   # resolver.host, resolver.port
            ...
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import dns.dnssec
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.rrset
from cryptography.hazmat.primitives.asymmetric import ec

from tests.support.fake_dns import FakeDns, Reply, Zone

SIGNATURE_LIFETIME = 86400
UNBOUND = shutil.which("unbound") or "/usr/sbin/unbound"


def _name(text: str) -> dns.name.Name:
    return dns.name.from_text(text, origin=dns.name.root)


@dataclass
class _Apex:
    name: dns.name.Name
    key: ec.EllipticCurvePrivateKey
    dnskey: Any
    broken: dict[tuple[dns.name.Name, int], str] = field(default_factory=dict)  # -> expired|missing|bad

    @property
    def anchor(self) -> str:
        """The trust anchor line for unbound: `"apex. DNSKEY 257 3 13 base64"`."""
        return f"{self.name.to_text()} DNSKEY {self.dnskey.to_text()}"


class SignedZone(Zone):
    """A `Zone` whose signed apexes answer like a DNSSEC-signed authoritative server."""

    def __init__(self, default_ttl: int = 0, negative_ttl: int = 0) -> None:
        super().__init__(default_ttl, negative_ttl)
        self._apexes: dict[dns.name.Name, _Apex] = {}
        self._sig_lock = threading.Lock()
        self._version = 0
        self._signed_version = -1
        self._rrsigs: dict[tuple[dns.name.Name, int], dns.rrset.RRset] = {}
        self._nsecs: dict[dns.name.Name, list[dns.rrset.RRset]] = {}

    # -- changes -----------------------------------------------------------------------------

    def sign(self, apex: str) -> str:
        """Sign `apex` (and everything below it); returns its trust anchor for `Unbound`."""
        name = _name(apex)
        key = ec.generate_private_key(ec.SECP256R1())
        dnskey = dns.dnssec.make_dnskey(key.public_key(), dns.dnssec.Algorithm.ECDSAP256SHA256, flags=257)
        self._apexes[name] = _Apex(name, key, dnskey)
        super().add(apex, "SOA", f"ns.fake-dns.invalid. hostmaster.fake-dns.invalid. 1 3600 600 86400 "
                                 f"{self.negative_ttl}", ttl=self.negative_ttl)
        self._changed()
        return self._apexes[name].anchor

    def break_rrset(self, owner: str, rdtype: str, how: str | None) -> None:
        """Make the RRSIG of one RRset `expired`, `missing` or `bad` (wrong signer key); None repairs."""
        assert how in (None, "expired", "missing", "bad")
        name = _name(owner)
        apex = self._apex_of(name)
        assert apex is not None, f"{owner} is not in a signed zone"
        key = (name, dns.rdatatype.from_text(rdtype))
        if how is None:
            apex.broken.pop(key, None)
        else:
            apex.broken[key] = how
        self._changed()

    def add(self, name: str, rdtype: str, value: str, ttl: int | None = None) -> None:
        super().add(name, rdtype, value, ttl)
        self._changed()

    def remove(self, name: str, rdtype: str | None = None, value: str | None = None) -> None:
        super().remove(name, rdtype, value)
        self._changed()

    def clear(self) -> None:
        super().clear()
        self._apexes.clear()
        self._changed()

    def _changed(self) -> None:
        with self._sig_lock:
            self._version += 1

    # -- answering ---------------------------------------------------------------------------

    def _apex_of(self, name: dns.name.Name) -> _Apex | None:
        best: _Apex | None = None
        for apex in self._apexes.values():
            if name.is_subdomain(apex.name) and (best is None or len(apex.name) > len(best.name)):
                best = apex
        return best

    def reply(self, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> Reply:
        self._resign()
        apex = self._apex_of(qname)
        if apex is not None and qname == apex.name and rdtype == dns.rdatatype.DNSKEY:
            rrset = dns.rrset.RRset(apex.name, dns.rdataclass.IN, dns.rdatatype.DNSKEY)
            rrset.add(apex.dnskey, self.default_ttl)
            return Reply(answer=[rrset, *self._sigs(apex.name, dns.rdatatype.DNSKEY)])
        if apex is not None and qname == apex.name and rdtype == dns.rdatatype.DS:
            return Reply()  # the (unsigned) parent's NODATA; the anchor sits at the apex
        reply = super().reply(qname, rdtype)
        if reply.drop or reply.rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            return reply
        answer: list[dns.rrset.RRset] = []
        for rrset in reply.answer:
            answer.append(rrset)
            answer.extend(self._sigs(rrset.name, rrset.rdtype))
        reply.answer = answer
        last = reply.answer[-1] if reply.answer else None
        final = qname
        if last is not None and last.rdtype == dns.rdatatype.RRSIG:
            last = next(r for r in reversed(reply.answer) if r.rdtype != dns.rdatatype.RRSIG)
        if last is not None and last.rdtype == dns.rdatatype.CNAME and rdtype != dns.rdatatype.CNAME:
            final = next(iter(last)).target
        negative = last is None or last.rdtype != rdtype
        final_apex = self._apex_of(final)
        if negative and final_apex is not None:
            soa = self._stored(final_apex.name, dns.rdatatype.SOA)
            reply.authority = [soa, *self._sigs(final_apex.name, dns.rdatatype.SOA)] if soa else reply.authority
            with self._sig_lock:
                nsecs = list(self._nsecs.get(final_apex.name, []))
            reply.authority.extend(nsecs)
        return reply

    def _stored(self, owner: dns.name.Name, rdtype: int) -> dns.rrset.RRset | None:
        with self._lock:
            rdataset = self._data.get(owner, {}).get(dns.rdatatype.RdataType.make(rdtype))
            if rdataset is None:
                return None
            return self._copy(owner, rdataset)

    @staticmethod
    def _copy(owner: dns.name.Name, rdataset: dns.rdataset.Rdataset) -> dns.rrset.RRset:
        rrset = dns.rrset.RRset(owner, rdataset.rdclass, rdataset.rdtype)
        rrset.update(rdataset)  # type: ignore[no-untyped-call]
        return rrset

    def _sigs(self, owner: dns.name.Name, rdtype: int) -> list[dns.rrset.RRset]:
        with self._sig_lock:
            sig = self._rrsigs.get((owner, int(rdtype)))
        return [sig] if sig is not None else []

    def _resign(self) -> None:
        with self._sig_lock:
            if self._signed_version == self._version:
                return
            version = self._version
        with self._lock:
            snapshot = {owner: {t: self._copy(owner, rds) for t, rds in node.items()}
                        for owner, node in self._data.items()}
        rrsigs: dict[tuple[dns.name.Name, int], dns.rrset.RRset] = {}
        nsecs: dict[dns.name.Name, list[dns.rrset.RRset]] = {}
        now = int(time.time())
        for apex in list(self._apexes.values()):
            owners = sorted(o for o in snapshot if self._apex_of(o) is apex)
            if apex.name not in owners:
                owners.insert(0, apex.name)
            dnskey = dns.rrset.RRset(apex.name, dns.rdataclass.IN, dns.rdatatype.DNSKEY)
            dnskey.add(apex.dnskey, self.default_ttl)
            to_sign: list[dns.rrset.RRset] = [dnskey]
            chain: list[dns.rrset.RRset] = []
            for i, owner in enumerate(owners):
                types = {int(t) for t in snapshot.get(owner, {})} | {dns.rdatatype.RRSIG, dns.rdatatype.NSEC}
                if owner == apex.name:
                    types.add(dns.rdatatype.DNSKEY)
                following = owners[(i + 1) % len(owners)]
                text = " ".join([following.to_text(), *sorted(dns.rdatatype.to_text(t) for t in types)])
                nsec = dns.rrset.RRset(owner, dns.rdataclass.IN, dns.rdatatype.NSEC)
                nsec.add(dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.NSEC, text), self.negative_ttl)
                chain.append(nsec)
                to_sign.extend(snapshot.get(owner, {}).values())
            to_sign.extend(chain)
            for rrset in to_sign:
                how = apex.broken.get((rrset.name, int(rrset.rdtype)))
                if how == "missing":
                    continue
                inception, expiration = now - 3600, now + SIGNATURE_LIFETIME
                if how == "expired":
                    inception, expiration = now - 10 * 86400, now - 86400
                key = ec.generate_private_key(ec.SECP256R1()) if how == "bad" else apex.key
                rrsig = dns.dnssec.sign(rrset, key, apex.name, apex.dnskey, inception=inception,
                                        expiration=expiration)
                sig = dns.rrset.RRset(rrset.name, dns.rdataclass.IN, dns.rdatatype.RRSIG)
                sig.add(rrsig, rrset.ttl)
                rrsigs[(rrset.name, int(rrset.rdtype))] = sig
            with_sigs: list[dns.rrset.RRset] = []
            for nsec in chain:
                with_sigs.append(nsec)
                if (nsec.name, int(dns.rdatatype.NSEC)) in rrsigs:
                    with_sigs.append(rrsigs[(nsec.name, int(dns.rdatatype.NSEC))])
            nsecs[apex.name] = with_sigs
        with self._sig_lock:
            self._rrsigs, self._nsecs = rrsigs, nsecs
            self._signed_version = version


def _free_udp_tcp_port(host: str) -> int:
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((host, 0))
            port = int(udp.getsockname()[1])
            with socket.socket() as tcp:
                try:
                    tcp.bind((host, port))
                except OSError:
                    continue
                return port
    raise OSError(f"no free port on {host}")


class Unbound:
    """Our own `unbound` process on `host` (loopback), validating with the given trust anchors."""

    def __init__(self, upstream: FakeDns, anchors: list[str], workdir: Path, host: str = "127.0.0.54",
                 cache: bool = False) -> None:
        self.upstream = upstream
        self.anchors = anchors
        self.workdir = workdir
        self.host = host
        self.port = 0
        self.cache = cache
        self.proc: subprocess.Popen[bytes] | None = None

    def config_text(self) -> str:
        anchors = "".join(f'    trust-anchor: "{a}"\n' for a in self.anchors)
        # cache: False keeps every answer for 0 s so each test sees its zone changes at once.
        ttl = "" if self.cache else "    cache-max-ttl: 0\n    cache-max-negative-ttl: 0\n    val-bogus-ttl: 0\n"
        return (
            "server:\n"
            f"    interface: {self.host}\n    port: {self.port}\n"
            "    do-ip6: no\n    do-daemonize: no\n    username: \"\"\n    chroot: \"\"\n"
            f"    directory: \"{self.workdir}\"\n    pidfile: \"\"\n    use-syslog: no\n    logfile: \"\"\n"
            "    verbosity: 1\n    access-control: 127.0.0.0/8 allow\n"
            "    do-not-query-localhost: no\n    local-zone: \"test.\" nodefault\n"
            "    module-config: \"validator iterator\"\n    qname-minimisation: no\n"
            "    aggressive-nsec: no\n    harden-dnssec-stripped: yes\n    val-log-level: 0\n"
            "    num-threads: 1\n    so-reuseport: no\n"
            f"{ttl}{anchors}"
            "remote-control:\n    control-enable: no\n"
            "stub-zone:\n    name: \"test.\"\n"
            f"    stub-addr: {self.upstream.host}@{self.upstream.port}\n"
        )

    def start(self, timeout: float = 10.0) -> Unbound:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = _free_udp_tcp_port(self.host)
        conf = self.workdir / "unbound.conf"
        conf.write_text(self.config_text())
        self.proc = subprocess.Popen([UNBOUND, "-d", "-c", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=open(self.workdir / "unbound.log", "wb"))  # noqa: SIM115
        deadline = time.monotonic() + timeout
        probe = dns.message.make_query("probe.invalid.", "A")
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"unbound exited: {(self.workdir / 'unbound.log').read_text()}")
            with contextlib.suppress(OSError, dns.exception.DNSException):
                dns.query.udp(probe, self.host, port=self.port, timeout=0.2)
                return self
            time.sleep(0.05)
        self.stop()
        raise TimeoutError("unbound did not answer")

    def query(self, name: str, rdtype: str) -> dns.message.Message:
        """One DO query to the resolver (for assertions in tests)."""
        q = dns.message.make_query(name, rdtype, want_dnssec=True)
        return dns.query.udp(q, self.host, port=self.port, timeout=3)

    def secure(self, name: str, rdtype: str) -> bool:
        return bool(self.query(name, rdtype).flags & dns.flags.AD)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None

    def __enter__(self) -> Unbound:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
