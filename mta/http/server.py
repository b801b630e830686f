"""The aiohttp application: routing, authentication and JSON errors; the work is done elsewhere.

    GET  /metrics                     Prometheus text format (mta.metrics)
    GET  /healthz                     200 while the event loop runs
    GET  /readyz                      200, or 503 with {"status": "not ready", "problems": [...]}
    GET  /api/queue                   the JSON of `mta queue list --json`
    GET  /api/queue/{id}              one message (that JSON plus its header section)
    POST /api/queue/flush             retry all deferred mail now
    POST /api/queue/{id}/flush|hold|release
    DELETE /api/queue/{id}

Rules: /api needs `Authorization: Bearer <http.admin_token>` whenever a token is set, and always
when `http.listen` is not a loopback address (without a token configured the API then answers
403: an unauthenticated queue API must never face a network). /metrics and the probes never need
it (scrapers and orchestrators). Every error is JSON {"error": ...} with the status that says what
happened (400 malformed, 401 no or wrong token, 403 not allowed here, 404 no such message or
path, 405 wrong method); an unexpected exception is logged and answered 500, never a traceback.
Operations are handed to the scheduler like `mta queue` requests and answered 202.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from mta import log, metrics
from mta.config import HttpConfig, parse_hostport
from mta.errors import MtaError
from mta.spool.store import SpoolStore
from mta.spool.view import header_text, load_all, meta_json, valid_id

_log = logging.getLogger("mta.http")

Problems = list[dict[str, str]]


@dataclass(frozen=True)
class Ops:
    """What the endpoint may do to the running relay (built by mta.http.relay_ops)."""

    store: SpoolStore
    request: Callable[[str, str | None], None]  # hand an operator request to the scheduler
    readiness: Callable[[], Awaitable[Problems]]  # what is wrong now; [] when ready


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def token_required(listen: str, token: str) -> bool:
    """A token is needed when one is set, and always off loopback."""
    host, _ = parse_hostport(listen)
    return bool(token) or not ipaddress.ip_address(host).is_loopback


def check_token(header: str | None, token: str, required: bool) -> ApiError | None:
    """None when the Authorization header lets the request through; else the error to answer."""
    if not required:
        return None
    if not token:
        return ApiError(403, "the queue API is off: http.listen is not a loopback address and http.admin_token "
                             "is not set")
    scheme, _, value = (header or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return ApiError(401, "missing bearer token", {"WWW-Authenticate": 'Bearer realm="mta"'})
    if not hmac.compare_digest(value.strip().encode("utf-8", "replace"), token.encode()):
        return ApiError(401, "invalid bearer token", {"WWW-Authenticate": 'Bearer realm="mta", error="invalid_token"'})
    return None


@web.middleware
async def _json_errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                       ) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return web.json_response({"error": exc.message}, status=exc.status, headers=exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() not in ("content-type", "content-length")}
        return web.json_response({"error": exc.reason.lower()}, status=exc.status, headers=headers)
    except asyncio.CancelledError:
        raise
    except Exception:
        _log.exception("HTTP %s %s failed", request.method, request.path)
        return web.json_response({"error": "internal error (see the log)"}, status=500)


def _queue_id(request: web.Request) -> str:
    qid = request.match_info["id"]
    if not valid_id(qid):
        raise ApiError(400, "malformed queue id (21 upper-case hex digits expected)")
    return qid


def make_app(ops: Ops, cfg: HttpConfig) -> web.Application:
    required = token_required(cfg.listen, cfg.admin_token)

    @web.middleware
    async def authorize(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                        ) -> web.StreamResponse:
        if request.path.startswith("/api/") or request.path == "/api":
            error = check_token(request.headers.get("Authorization"), cfg.admin_token, required)
            if error is not None:
                raise error
        return await handler(request)

    async def get_metrics(request: web.Request) -> web.Response:
        body = metrics.exposition()  # reads memory only: microseconds, no thread hop
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4})

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        problems = await ops.readiness()
        if problems:
            return web.json_response({"status": "not ready", "problems": problems}, status=503)
        return web.json_response({"status": "ready"})

    async def queue_list(request: web.Request) -> web.Response:
        metas = await asyncio.to_thread(load_all, ops.store)
        return web.json_response([meta_json(m) for m in metas])

    def _show(qid: str) -> dict[str, Any] | None:
        try:
            out = meta_json(ops.store.load_sync(qid))
            out["headers"] = header_text(ops.store, qid)
        except (MtaError, OSError):
            return None  # gone meanwhile, or never there
        return out

    async def queue_show(request: web.Request) -> web.Response:
        qid = _queue_id(request)
        found = await asyncio.to_thread(_show, qid)
        if found is None:
            raise ApiError(404, f"no such message {qid}")
        return web.json_response(found)

    async def _operate(request: web.Request, op: str, qid: str | None) -> web.Response:
        await request.read()  # no body is expected; one over client_max_size is refused (413)
        if qid is not None and not await asyncio.to_thread(ops.store.exists, qid):
            raise ApiError(404, f"no such message {qid}")
        ops.request(op, qid)
        peer = request.remote or "?"
        log.event("api", op=op, queue_id=qid, client=peer)
        return web.json_response({"op": op, "id": qid, "status": "accepted"}, status=202)

    async def flush_all(request: web.Request) -> web.Response:
        return await _operate(request, "flush", None)

    async def queue_op(request: web.Request) -> web.Response:
        qid = _queue_id(request)
        op = request.match_info["op"]
        if op not in ("flush", "hold", "release"):
            raise ApiError(404, f"unknown operation {op!r} (flush, hold, release)")
        return await _operate(request, op, qid)

    async def queue_delete(request: web.Request) -> web.Response:
        return await _operate(request, "delete", _queue_id(request))

    app = web.Application(middlewares=[_json_errors, authorize], client_max_size=64 * 1024)
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/api/queue", queue_list)
    app.router.add_post("/api/queue/flush", flush_all)
    app.router.add_get("/api/queue/{id}", queue_show)
    app.router.add_delete("/api/queue/{id}", queue_delete)
    app.router.add_post("/api/queue/{id}/{op}", queue_op)
    return app


async def start(ops: Ops, cfg: HttpConfig) -> web.AppRunner:
    """Listen on `cfg.listen`; stop with `await runner.cleanup()`."""
    host, port = parse_hostport(cfg.listen)
    runner = web.AppRunner(make_app(ops, cfg), access_log=None, handle_signals=False, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise MtaError(f"http.listen {cfg.listen}: cannot listen: {exc.strerror or exc}") from None
    return runner
