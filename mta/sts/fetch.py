"""HTTPS fetch of an MTA-STS policy (RFC 8461 §3.2, §3.3); aiohttp and ssl errors are mapped here only.

Rule: a policy is only what one verified HTTPS GET of `https://mta-sts.<domain>/.well-known/mta-sts.txt`
answers with status 200, a `text/plain` body of at most 64 KiB, within the time limit. Everything
else raises, typed for TLS-RPT (STS-92):

- `StsFetchError("sts-webpki-invalid")`: the certificate is not PKIX-valid for the host (STS-27/28);
- `StsFetchError("sts-policy-fetch-error")`: DNS, connection, timeout, non-200 (STS-30), redirect
  (never followed, STS-31), oversized body (STS-34);
- `StsPolicyError` ("sts-policy-invalid"): wrong or missing media type (STS-33), unparsable body.

The HTTP client is deliberately bare (STS-32, STS-38): no ambient proxies or .netrc
(trust_env=False), no cookies, no HTTP cache or conditional headers, no content decoding, and
host names resolved by our own DNS resolver, never the system's.
"""

from __future__ import annotations

import asyncio
import ssl

import aiohttp

from mta.errors import DnsError, StsFetchError, StsPolicyError
from mta.net.dns import AiohttpResolver, Resolver, to_ascii
from mta.net.tls import verifying_context  # chain, validity, DNS-ID only (STS-27/28), TLS 1.2+
from mta.sts.draft03 import parse_draft_policy
from mta.sts.policy import POLICY_HOST_LABEL, Policy, parse_policy

MAX_BODY = 64 * 1024  # STS-34: RFC 8461 §3.3 suggests 64 KiB
WEBPKI_INVALID = "sts-webpki-invalid"
FETCH_ERROR = "sts-policy-fetch-error"

_PATHS = {"rfc8461": "/.well-known/mta-sts.txt", "draft03": "/.well-known/mta-sts.json"}
# STS-33: text/plain only; the draft served JSON (SEED-S3), so its dialect also accepts that.
_MEDIA_TYPES = {"rfc8461": ("text/plain",), "draft03": ("text/plain", "application/json")}


def policy_url(domain: str, https_port: int, dialect: str = "rfc8461") -> str:
    """`https://mta-sts.<a-label domain>[:port]/.well-known/mta-sts.txt` (STS-25, STS-5)."""
    host = f"{POLICY_HOST_LABEL}.{to_ascii(domain)}"
    netloc = host if https_port == 443 else f"{host}:{https_port}"
    return f"https://{netloc}{_PATHS[dialect]}"


def new_session(resolver: Resolver, ca_file: str | None, connect_timeout: float = 10.0) -> aiohttp.ClientSession:
    """A client session fit for policy fetches (STS-32, STS-38); may be shared across fetches."""
    connector = aiohttp.TCPConnector(
        resolver=AiohttpResolver(resolver),
        ssl=verifying_context(ca_file),
        use_dns_cache=False,  # our resolver decides about caching, not aiohttp
        force_close=True,  # one request per connection: nothing stale is ever reused
    )
    return aiohttp.ClientSession(
        connector=connector,
        trust_env=False,  # STS-38: no HTTP(S)_PROXY, no .netrc
        cookie_jar=aiohttp.DummyCookieJar(),  # STS-38: no cookies
        auto_decompress=False,  # a compressed body is not text/plain policy text; no zip bombs
        timeout=aiohttp.ClientTimeout(total=60.0, sock_connect=connect_timeout),
    )


async def fetch_policy(
    domain: str,
    *,
    https_port: int,
    resolver: Resolver,
    ca_file: str | None,
    timeout: float = 60.0,
    connect_timeout: float = 10.0,
    dialect: str = "rfc8461",
    session: aiohttp.ClientSession | None = None,
) -> tuple[Policy, str]:
    """Fetch and parse the policy of `domain`; returns (policy, raw text).

    Raises StsFetchError (with .result_type) or StsPolicyError, nothing else.
    """
    if dialect not in _PATHS:
        raise ValueError(f"unknown dialect {dialect!r}")
    try:
        url = policy_url(domain, https_port, dialect)
    except (DnsError, UnicodeError, ValueError) as exc:
        raise StsFetchError(f"invalid policy domain {domain!r}: {exc}", FETCH_ERROR) from exc
    own = session is None
    if session is None:
        session = new_session(resolver, ca_file, connect_timeout)
    try:
        # STS-35: one deadline for connect + TLS + headers + body, on top of aiohttp's own.
        async with asyncio.timeout(timeout):
            body = await _get(session, url, ca_file, timeout, connect_timeout, dialect)
    except TimeoutError as exc:
        raise StsFetchError(f"{url}: timed out after {timeout:g}s", FETCH_ERROR) from exc
    finally:
        if own:
            await session.close()
    return _parse(body, dialect)


async def _get(
    session: aiohttp.ClientSession,
    url: str,
    ca_file: str | None,
    timeout: float,
    connect_timeout: float,
    dialect: str,
) -> bytes:
    try:
        async with session.get(
            url,
            allow_redirects=False,  # STS-31: a 3xx is a failure, its Location is never requested
            ssl=verifying_context(ca_file),
            timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=connect_timeout),
            # STS-32: no conditional or cache headers are ever sent; ask for the plain body.
            headers={"Accept-Encoding": "identity", "Cache-Control": "no-cache"},
        ) as resp:
            if resp.status != 200:  # STS-30: only 200 yields a policy
                where = f" to {resp.headers.get('Location')!r}" if 300 <= resp.status < 400 else ""
                raise StsFetchError(f"{url}: HTTP {resp.status}{where} (only 200 is accepted)", FETCH_ERROR)
            _check_media_type(resp, url, dialect)
            declared = resp.content_length
            if declared is not None and declared > MAX_BODY:
                raise StsFetchError(f"{url}: Content-Length {declared} exceeds {MAX_BODY} bytes", FETCH_ERROR)
            return await _read_capped(resp, url)
    except (StsFetchError, StsPolicyError):
        raise
    except aiohttp.ClientConnectorCertificateError as exc:  # STS-27/28: chain, expiry, name
        raise StsFetchError(f"{url}: certificate not valid: {exc.certificate_error}", WEBPKI_INVALID) from exc
    except aiohttp.ClientConnectorDNSError as exc:
        raise StsFetchError(f"{url}: cannot resolve policy host: {exc.os_error}", FETCH_ERROR) from exc
    except DnsError as exc:
        raise StsFetchError(f"{url}: cannot resolve policy host: {exc}", FETCH_ERROR) from exc
    except (aiohttp.ServerTimeoutError, TimeoutError) as exc:
        raise StsFetchError(f"{url}: timed out after {timeout:g}s ({type(exc).__name__})", FETCH_ERROR) from exc
    except ssl.SSLCertVerificationError as exc:
        raise StsFetchError(f"{url}: certificate not valid: {exc}", WEBPKI_INVALID) from exc
    except (aiohttp.ClientError, ssl.SSLError, OSError) as exc:
        # refused, reset, TLS handshake trouble that is not a certificate verdict, bad HTTP
        raise StsFetchError(f"{url}: {type(exc).__name__}: {exc}", FETCH_ERROR) from exc


def _check_media_type(resp: aiohttp.ClientResponse, url: str, dialect: str) -> None:
    """STS-33: text/plain in any case with any parameters; a missing Content-Type is invalid."""
    raw = resp.headers.get("Content-Type")
    if raw is None:
        raise StsPolicyError(f"{url}: no Content-Type (text/plain required)")
    media = raw.split(";", 1)[0].strip().lower()
    if media not in _MEDIA_TYPES[dialect]:
        raise StsPolicyError(f"{url}: Content-Type {raw!r} is not text/plain")
    encoding = resp.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise StsPolicyError(f"{url}: Content-Encoding {encoding!r} (a plain body is required)")


async def _read_capped(resp: aiohttp.ClientResponse, url: str) -> bytes:
    """Read at most MAX_BODY bytes whatever the framing (chunked, lying or no length), STS-34."""
    parts: list[bytes] = []
    size = 0
    while True:
        chunk = await resp.content.read(MAX_BODY + 1 - size)
        if not chunk:
            return b"".join(parts)
        size += len(chunk)
        if size > MAX_BODY:
            raise StsFetchError(f"{url}: body exceeds {MAX_BODY} bytes", FETCH_ERROR)
        parts.append(chunk)


def _parse(body: bytes, dialect: str) -> tuple[Policy, str]:
    policy = parse_draft_policy(body) if dialect == "draft03" else parse_policy(body)
    # parse_* accepted the body, so it is valid UTF-8 (STS-53)
    return policy, body.decode("utf-8")
