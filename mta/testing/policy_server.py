"""A real HTTPS server for MTA-STS policy hosts, for tests (the O-HTTP observable).

Rule: one listening socket (127.0.0.x, ephemeral port unless told otherwise) hosts any number of
`mta-sts.<domain>` names. The certificate is chosen per SNI name (STS-26) from `TestPki`, so a
host can present a valid, expired, untrusted, wrong-name, CN-only or wildcard certificate
(STS-27/28). HTTP is spoken by hand over asyncio streams so a test can make the server misbehave
in ways a framework would refuse: wrong status, redirects, missing Content-Type, oversized bodies
sent chunked, with no length or with a lying Content-Length (STS-34), stalls and one-byte drips
(STS-35). Every request is logged (SNI, Host header, method, path, headers) so a test can count
requests (STS-31, STS-36, STS-55) and check what the client sent (STS-25, STS-32).

Usage in the caller's loop::

    async with PolicyServer(pki, "127.0.0.5") as server:
        server.policy("example.com", "version: STSv1\\nmode: enforce\\nmx: mx.example.com\\nmax_age: 86400\\n")
        ... fetch from https://mta-sts.example.com:{server.port}/.well-known/mta-sts.txt ...
        assert len(server.requests) == 1

For a subprocess relay, `server.start_in_thread()` / `server.stop_thread()` run it on its own loop.
Configuration and logs may be touched from either thread (plain dict/list operations).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass, field
from http import HTTPStatus
from types import TracebackType

from mta.testing.loop_thread import LoopThread
from mta.testing.pki import Leaf, TestPki

TXT_PATH = "/.well-known/mta-sts.txt"
JSON_PATH = "/.well-known/mta-sts.json"  # draft-03 (SEED-S2)

#: Certificate kinds a host can present; see `PolicyServer.add_host`.
CERT_KINDS = ("valid", "expired", "untrusted", "wrong-name", "cn-only", "cn-mismatch", "wildcard", "partial-wildcard")


@dataclass(frozen=True)
class Request:
    """One HTTP request as the server saw it."""

    sni: str | None
    host: str | None
    method: str
    path: str
    version: str
    headers: tuple[tuple[str, str], ...]

    def header(self, name: str) -> str | None:
        """The first value of header `name` (case-insensitive), or None."""
        lname = name.lower()
        for key, value in self.headers:
            if key.lower() == lname:
                return value
        return None


@dataclass
class Behaviour:
    """What the server answers for one (host, path).

    framing: "length" (Content-Length, possibly the lie in `content_length`), "chunked", or
    "close" (no length; the body ends when the connection closes).
    stall: None, "before-headers" (accept, read the request, never answer) or "after-headers".
    drip: seconds between single body bytes (None = send at once).
    """

    body: bytes = b""
    status: int = 200
    content_type: str | None = "text/plain"
    location: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    framing: str = "length"
    content_length: int | None = None
    stall: str | None = None
    drip: float | None = None


@dataclass
class _Host:
    context: ssl.SSLContext
    paths: dict[str, Behaviour] = field(default_factory=dict)


class PolicyServer:
    """An HTTPS server answering as many `mta-sts.<domain>` hosts as configured."""

    def __init__(self, pki: TestPki, address: str = "127.0.0.1", port: int = 0) -> None:
        self.pki = pki
        self.address = address
        self._port = port
        self._hosts: dict[str, _Host] = {}
        self.requests: list[Request] = []
        #: Every SNI name offered in a ClientHello (None when the client sent none), in order,
        #: including handshakes the client later aborted because it rejected the certificate.
        self.sni_seen: list[str | None] = []
        default = pki.leaf("default.invalid")  # what a client without (or with unknown) SNI gets
        self._default_context = default.server_context()
        self._listen_context = default.server_context()
        self._listen_context.sni_callback = self._on_sni
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._runner: LoopThread | None = None
        self._closing = asyncio.Event()

    # ----- configuration -------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound port (known after start)."""
        return self._port

    def add_host(self, name: str, cert: Leaf | str = "valid") -> None:
        """Serve `name` (SNI) with a certificate of kind `cert` (one of CERT_KINDS) or a given Leaf."""
        name = name.lower()
        leaf = cert if isinstance(cert, Leaf) else self._leaf_for(name, cert)
        old = self._hosts.get(name)
        self._hosts[name] = _Host(leaf.server_context(), old.paths if old else {})

    def set(self, name: str, path: str = TXT_PATH, **behaviour: object) -> Behaviour:
        """Answer GET `path` on host `name` with a `Behaviour(**behaviour)`; adds the host if new.

        `body` may be given as str (encoded UTF-8, sent byte for byte: LF or CRLF as written).
        """
        name = name.lower()
        if name not in self._hosts:
            self.add_host(name)
        body = behaviour.get("body", b"")
        if isinstance(body, str):
            behaviour["body"] = body.encode("utf-8")
        beh = Behaviour(**behaviour)  # type: ignore[arg-type]
        self._hosts[name].paths[path] = beh
        return beh

    def policy(self, domain: str, text: str | bytes, *, cert: Leaf | str | None = None, **behaviour: object) -> str:
        """Publish `text` as the policy of `domain` at https://mta-sts.<domain>/.well-known/mta-sts.txt."""
        name = f"mta-sts.{domain}".lower()
        if cert is not None or name not in self._hosts:
            self.add_host(name, cert if cert is not None else "valid")
        self.set(name, TXT_PATH, body=text, **behaviour)
        return name

    def remove(self, name: str) -> None:
        """Stop serving `name` (its SNI then gets the default certificate)."""
        self._hosts.pop(name.lower(), None)

    def requests_for(self, name: str) -> list[Request]:
        """Requests whose Host header (without port) is `name`."""
        name = name.lower()
        return [r for r in self.requests if r.host is not None and r.host.rsplit(":", 1)[0].lower() == name]

    def _leaf_for(self, name: str, kind: str) -> Leaf:
        parent = name.split(".", 1)[1] if "." in name else name
        if kind == "valid":
            return self.pki.leaf(name)
        if kind == "expired":
            return self.pki.leaf(name, expired=True)
        if kind == "untrusted":
            return self.pki.leaf(name, untrusted=True)
        if kind == "wrong-name":
            return self.pki.leaf(f"www.{parent}")
        if kind == "cn-only":
            return self.pki.cn_only_leaf(name)
        if kind == "wildcard":
            return self.pki.leaf(f"*.{parent}")
        if kind == "partial-wildcard":
            # STS-28/ID-4: "mta-*.example.com" (trustme refuses to mint it, so build it by hand)
            return self.pki.custom_leaf(name, [f"{name.split('-', 1)[0]}-*.{parent}"])
        if kind == "cn-mismatch":
            # STS-28: the name only in the subject CN, a different name in the SAN.
            return self.pki.custom_leaf(name, [f"other.{parent}"])
        raise ValueError(f"unknown certificate kind {kind!r}; one of {CERT_KINDS}")

    def _on_sni(self, ssl_obj: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> None:
        name = server_name.lower() if server_name else None
        self.sni_seen.append(name)
        ssl_obj._policy_server_sni = name  # type: ignore[attr-defined]  # read back in _handle
        host = self._hosts.get(name) if name else None
        ssl_obj.context = host.context if host else self._default_context

    # ----- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Listen on (address, port) in the running loop."""
        self._closing = asyncio.Event()
        self._server = await asyncio.start_server(
            self._handle, self.address, self._port, ssl=self._listen_context, ssl_handshake_timeout=5
        )
        self._port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Close the listener and abort every open connection (stalled handlers included)."""
        if self._server is not None:
            self._server.close()
        self._closing.set()  # stalled and dripping handlers return (a cancelled one would log noise)
        for writer in list(self._writers):
            writer.transport.abort()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> PolicyServer:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def start_in_thread(self) -> None:
        """Run the server on a private loop in a daemon thread (for subprocess relays)."""
        self._runner = LoopThread("policy-server")
        self._runner.start(self.start)

    def stop_thread(self) -> None:
        """Stop a server started with start_in_thread."""
        if self._runner is not None:
            self._runner.stop(self.stop)
            self._runner = None

    # ----- HTTP ----------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            await self._serve_one(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ssl.SSLError):
            pass  # the client gave up (e.g. after the size cap): expected in these tests
        finally:
            self._writers.discard(writer)
            self._tasks.discard(task)
            writer.transport.abort()

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, path, version = ([*lines[0].split(" ", 2), "", "", ""])[:3]
        headers = tuple(
            (k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:] if line)
        )
        sni = getattr(writer.get_extra_info("ssl_object"), "_policy_server_sni", None)
        host_header = next((v for k, v in headers if k.lower() == "host"), None)
        request = Request(sni, host_header, method, path, version, headers)
        self.requests.append(request)

        hostname = (request.host or sni or "").rsplit(":", 1)[0].lower()
        host = self._hosts.get(hostname)
        beh = host.paths.get(path) if host else None
        if beh is None:
            beh = Behaviour(body=b"not found\n", status=404)
        if beh.stall == "before-headers" and await self._pause(3600):
            return
        writer.write(self._head(beh))
        await writer.drain()
        if beh.stall == "after-headers" and await self._pause(3600):
            return
        await self._body(beh, writer)
        await writer.drain()

    async def _pause(self, seconds: float) -> bool:
        """Sleep, but wake when the server stops; True if it is stopping."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), seconds)
        return self._closing.is_set()

    @staticmethod
    def _head(beh: Behaviour) -> bytes:
        try:
            reason = HTTPStatus(beh.status).phrase
        except ValueError:
            reason = "Status"
        out = [f"HTTP/1.1 {beh.status} {reason}", "Connection: close"]
        if beh.content_type is not None:
            out.append(f"Content-Type: {beh.content_type}")
        if beh.location is not None:
            out.append(f"Location: {beh.location}")
        out.extend(f"{k}: {v}" for k, v in beh.headers)
        if beh.framing == "length":
            length = beh.content_length if beh.content_length is not None else len(beh.body)
            out.append(f"Content-Length: {length}")
        elif beh.framing == "chunked":
            out.append("Transfer-Encoding: chunked")
        elif beh.framing != "close":
            raise ValueError(f"unknown framing {beh.framing!r}")
        return ("\r\n".join(out) + "\r\n\r\n").encode("latin-1")

    async def _body(self, beh: Behaviour, writer: asyncio.StreamWriter) -> None:
        body = beh.body
        step = 1 if beh.drip else 4096
        for start in range(0, len(body), step):
            piece = body[start : start + step]
            if beh.framing == "chunked":
                piece = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
            writer.write(piece)
            await writer.drain()
            if beh.drip and await self._pause(beh.drip):
                return
        if beh.framing == "chunked":
            writer.write(b"0\r\n\r\n")


def make_padded_policy(text: str, size: int) -> bytes:
    """`text` (a policy ending in LF) padded with extension lines to exactly `size` bytes (STS-34)."""
    data = text.encode()
    out = [data]
    remaining = size - len(data)
    while remaining > 0:
        # an extension line "xN: aaaa\n" (RFC 8461 §3.2 policy-ext-name/value), at least 6 bytes
        line_len = min(remaining, 1000)
        if remaining - line_len and remaining - line_len < 6:
            line_len -= 6
        name = f"x{len(out)}: "
        value_len = line_len - len(name) - 1
        if value_len < 1:
            raise ValueError("cannot pad to that size")
        out.append(name.encode() + b"a" * value_len + b"\n")
        remaining -= line_len
    result = b"".join(out)
    assert len(result) == size, (len(result), size)
    return result
