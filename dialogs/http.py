"""aiohttp plumbing both apps use: request ids, error responses, request metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram

from dialogs import errors, logs
from dialogs.wire import MAX_REQUEST_ID_LENGTH, REQUEST_ID_HEADER

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

REQUEST_ID: web.RequestKey[str] = web.RequestKey("request_id", str)

# Milliseconds matter here: the proxy adds well under one to a query.
# Sends per batch (proxy-to-worker requests, group-commit transactions).
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.0, 2.0, 5.0)

# Bodies are at most tens of KiB: one still arriving after this long is a slow-body attack
# (headers are bounded by the server's idle timeout, see the settings).
BODY_READ_TIMEOUT = 10.0
# After answering without reading the whole body (a 401 or 408 first), the server drains
# the rest for at most this long before closing (aiohttp's default is 10 s).
LINGERING_SECONDS = 2.0

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

_HTTP_ERRORS = {
    404: errors.NotFound("no such route"),
    405: errors.MethodNotAllowed(),
    413: errors.BodyTooLarge(),
}


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(data),  # UTF-8, compact; several times faster than json.dumps
        status=status,
        content_type="application/json",
        headers=headers,
    )


def error_response(exc: errors.DialogsError, request_id: str, status: int | None = None) -> web.Response:
    headers = {REQUEST_ID_HEADER: request_id, **exc.headers()}
    return json_response(exc.to_json(request_id), status=status or exc.status, headers=headers)


def request_id_of(request: web.Request) -> str:
    return request.get(REQUEST_ID, "")


def rename_request(request: web.Request, request_id: str) -> None:
    """Name the request by a handler's better id (an internal list carries the client's in
    its query): the response, its error JSON and the log lines use it from here on."""
    request[REQUEST_ID] = request_id
    logs.REQUEST_ID.set(request_id)  # the middleware's reset restores what was before it


class RequestMetrics:
    """Requests by route, method and status, and latency by route and method.

    ``observe`` binds each label combination's children once and keeps them: the label
    values are bounded (route templates, methods, statuses), and ``labels()`` on every
    request was a dictionary build, a lock and a lookup each time.
    """

    def __init__(self, registry: CollectorRegistry, prefix: str) -> None:
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self.requests = Counter(
            f"{prefix}_requests", "HTTP requests by route and status", ["route", "method", "status"], registry=registry
        )
        self.latency = Histogram(
            f"{prefix}_request_seconds",
            "HTTP request latency by route",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        children = self._children.get((route, method, status))
        if children is None:
            children = self._children[(route, method, status)] = (
                self.requests.labels(route, method, str(status)),
                self.latency.labels(route, method),
            )
        children[0].inc()
        children[1].observe(seconds)


def new_request_id() -> str:
    """128 random bits as hex, like a UUID's, without building a UUID object."""
    return os.urandom(16).hex()


def _route_name(request: web.Request) -> str:
    # The route template, never the raw path: user ids must not become label values.
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


# Bodies larger than this are written under the write timeout (smaller ones go to the
# socket's buffer at once, whoever reads them).
TIMED_WRITE_BYTES = 64 * 1024


async def _write_within(request: web.Request, response: web.Response, seconds: float) -> None:
    """Send ``response`` now, closing the connection if the client has not taken it within
    ``seconds``: a client that asks for a large body and never reads would otherwise keep
    it, and its connection, in memory for as long as it likes (the idle timeout counts only
    between requests). aiohttp then finds the response sent, or the connection gone."""
    try:
        async with asyncio.timeout(seconds):
            await response.prepare(request)
            await response.write_eof()
    except TimeoutError:
        log.warning(
            "closed a connection that did not read its response within %.0f s",
            seconds,
            extra={"request_id": request_id_of(request)},
        )
        if request.transport is not None:
            request.transport.abort()  # drops the unsent bytes with the connection
    except ConnectionError:
        pass  # the client went away: nothing to send it


def make_middleware(
    metrics: RequestMetrics, write_timeout: float | None = None
) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        request_id = request.headers.get(REQUEST_ID_HEADER) or new_request_id()
        if len(request_id) > MAX_REQUEST_ID_LENGTH or not request_id.isprintable():
            request_id = new_request_id()
        request[REQUEST_ID] = request_id
        token = logs.REQUEST_ID.set(request_id)
        started = time.perf_counter()
        try:
            try:
                response = await handler(request)
            finally:
                request_id = request[REQUEST_ID]  # a handler may have renamed it
        except errors.DialogsError as exc:
            response = error_response(exc, request_id)
        except web.HTTPException as exc:
            mapped = _HTTP_ERRORS.get(exc.status) or errors.DialogsError(exc.reason)
            response = error_response(mapped, request_id, status=exc.status)
            if "Allow" in exc.headers:  # a 405 says which methods the route takes (RFC 9110)
                response.headers["Allow"] = exc.headers["Allow"]
        except Exception:
            log.exception("unhandled error")
            response = error_response(errors.DialogsError(), request_id)
        finally:
            logs.REQUEST_ID.reset(token)
        route = _route_name(request)
        elapsed = time.perf_counter() - started
        if response.prepared:  # a WebSocket, over: its messages were counted as they came
            return response
        response.headers[REQUEST_ID_HEADER] = request_id
        method = request.method if request.method in _METHODS else "OTHER"  # label values stay bounded
        metrics.observe(route, method, response.status, elapsed)
        if log.isEnabledFor(logging.DEBUG) or response.status >= 500:
            log.log(
                logging.ERROR if response.status >= 500 else logging.DEBUG,
                "%s %s %s",
                request.method,
                route,
                response.status,
                extra={"request_id": request_id, "status": response.status, "ms": round(elapsed * 1000, 3)},
            )
        if write_timeout is not None and isinstance(response, web.Response):
            body = response.body
            if isinstance(body, bytes) and len(body) > TIMED_WRITE_BYTES:
                await _write_within(request, response, write_timeout)
        return response

    return middleware


_REQUIRED = object()  # read_json: a body is required


async def read_body(request: web.Request) -> bytes:
    """The request body. Oversized bodies raise BodyTooLarge; a body that takes longer than
    BODY_READ_TIMEOUT to arrive raises RequestTimeout."""
    try:
        async with asyncio.timeout(BODY_READ_TIMEOUT):
            return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise errors.BodyTooLarge() from None
    except TimeoutError:
        raise errors.RequestTimeout() from None


async def read_json(request: web.Request, loads: Callable[[bytes], Any] = json.loads, *, empty: Any = _REQUIRED) -> Any:
    """The request body as JSON, or InvalidInput. Oversized bodies raise BodyTooLarge; a
    body that takes longer than BODY_READ_TIMEOUT to arrive raises RequestTimeout.

    ``loads``: the standard library's by default, whose errors the public API's messages
    describe (a lone surrogate is read, then refused as "not valid Unicode" by the checks);
    the worker reads the proxies' batches, which orjson wrote, with ``orjson.loads``.
    ``empty``: what an empty body stands for, where the route takes none (else a 400)."""
    raw = await read_body(request)
    if not raw:
        if empty is not _REQUIRED:
            return empty
        raise errors.InvalidInput("request body must be JSON")
    try:
        return loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise errors.InvalidInput("request body is not valid JSON") from None
    except RecursionError:
        raise errors.InvalidInput("request body is nested too deeply") from None


def bearer_token(request: web.Request, missing: str = "missing bearer token") -> str:
    """The token of an ``Authorization: Bearer …`` header, or Unauthorized.

    A token is printable ASCII (RFC 6750's b64token); anything else, such as header bytes
    that are not UTF-8, is refused here rather than failing later in a decoder.
    """
    header = request.headers.get("Authorization")
    if header is None or not header.strip():
        raise errors.Unauthorized(missing)
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer":
        raise errors.Unauthorized(
            "the Authorization header must use the Bearer scheme: `Authorization: Bearer <token>`"
        )
    if not token:
        raise errors.Unauthorized("the bearer token is empty: `Authorization: Bearer <token>`")
    if not (token.isascii() and token.isprintable()):
        raise errors.Unauthorized("malformed bearer token")
    return token
