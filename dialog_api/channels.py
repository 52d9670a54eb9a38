"""The worker's end of the proxies' batch channels (``dialogs/wire.py``, "Channels").

A proxy opens a WebSocket on a batch path and keeps it: each binary message is one batch,
carried out exactly as a POST of the same body, and answered by one binary message (its
status line, then the POST's answer) before the next is read. One batch at a time per
channel; a proxy opens as many channels as it keeps batches in flight.

The promise that makes a closed channel safe to retry: a channel this worker closes with
GOING_AWAY (1001) has answered every batch it took. It closes so when it is idle for the
worker's idle timeout and when the worker shuts down (at once if idle, else right after
answering its batch); a batch that arrives after that decision is dropped unread. A proxy
whose batch meets that close therefore knows nothing of it was carried out, and sends it
again, as it would on a connection that was never made.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import WSCloseCode, WSMsgType, web

from dialog_api.metrics import WorkerMetrics
from dialogs import errors, wire
from dialogs.http import request_id_of

log = logging.getLogger(__name__)

# How long a close waits for the proxy's close in return (a proxy answers at once, from the
# reader it keeps on every channel; one that is stopped must not hold a shutdown up).
CLOSE_TIMEOUT = 2.0

# Answers a batch's body as the POST of that body would, or raises its error.
BatchAnswer = Callable[[web.Application, bytes, str], Awaitable[bytes]]


@dataclass(eq=False)
class _Open:
    ws: web.WebSocketResponse
    task: asyncio.Task[Any]  # the one serving it
    busy: bool = False  # a batch taken and not yet answered: the channel does not close as 1001
    stopping: bool = False  # the shutdown cancelled its wait for the next batch


class Channels:
    """This worker's open channels, and their closing when it shuts down."""

    def __init__(self, idle_timeout: float, max_batch_bytes: int, metrics: WorkerMetrics) -> None:
        self._idle_timeout = idle_timeout
        self._max_batch_bytes = max_batch_bytes
        self._metrics = metrics
        self._open: set[_Open] = set()
        metrics.channels_open.set_function(lambda: len(self._open))
        self._shutdown = asyncio.Event()  # set once the worker shuts down

    async def serve(self, request: web.Request, answer: BatchAnswer, route: str) -> web.WebSocketResponse:
        """Carry out the batches of one channel until the proxy closes it, it idles past the
        idle timeout, or the worker shuts down."""
        ws = web.WebSocketResponse(
            timeout=CLOSE_TIMEOUT, compress=False, max_msg_size=self._max_batch_bytes, autoping=True
        )
        await ws.prepare(request)
        task = asyncio.current_task()
        assert task is not None
        channel = _Open(ws, task)
        self._open.add(channel)
        self._metrics.channels_opened.inc()
        request_id = request_id_of(request)
        refused = False
        try:
            while not self._shutdown.is_set():
                try:
                    message = await ws.receive(timeout=self._idle_timeout)
                except TimeoutError:
                    break  # idle: closed below as GOING_AWAY, nothing taken
                except asyncio.CancelledError:
                    if not channel.stopping:
                        raise
                    task.uncancel()  # ``close_all``'s own: closed below as GOING_AWAY
                    break
                if self._shutdown.is_set():
                    break  # read after the worker began closing: dropped unread (see above)
                if message.type is not WSMsgType.BINARY:
                    if message.type is WSMsgType.TEXT:
                        refused = True  # not this wire: closed below, nothing taken
                    break  # the proxy closed it (or the connection broke)
                channel.busy = True
                reply = await self._carry_out(request.app, answer, message.data, request_id, route)
                try:
                    await ws.send_bytes(reply)
                except ConnectionError:
                    break  # the proxy went away: it takes the batch as broken (maybe done)
                channel.busy = False
        finally:
            self._open.discard(channel)  # first: a shutdown from here on does not cancel the close
            if not ws.closed:
                # GOING_AWAY promises every batch taken was answered (the proxy may send
                # the next one again); one cut short (cancelled) is an internal error.
                if channel.busy:
                    await ws.close(code=WSCloseCode.INTERNAL_ERROR, message=b"a batch was cut short")
                elif refused:
                    await ws.close(code=WSCloseCode.UNSUPPORTED_DATA, message=b"batches are binary messages")
                else:
                    await ws.close(code=WSCloseCode.GOING_AWAY, message=b"worker closing the channel")
        return ws

    async def _carry_out(
        self, app: web.Application, answer: BatchAnswer, body: bytes, request_id: str, route: str
    ) -> bytes:
        started = time.perf_counter()
        try:
            status, reply = 200, await answer(app, body, request_id)
        except errors.DialogsError as exc:
            status, reply = exc.status, orjson.dumps(wire.error_json(exc, request_id))
        except Exception:
            log.exception("unhandled error in a batch channel", extra={"request_id": request_id})
            internal = errors.DialogsError()
            status, reply = internal.status, orjson.dumps(wire.error_json(internal, request_id))
        self._metrics.http.observe(route, "WS", status, time.perf_counter() - started)
        return wire.channel_reply(status, reply)

    def close_all(self) -> None:
        """On shutdown: no channel takes another batch. An idle one stops waiting for its
        next batch and closes at once, a busy one right after its answer, each from its
        own task, which reads until the proxy's close in return (dropping unread any batch
        that crossed it); the server's shutdown waits for them."""
        self._shutdown.set()
        for channel in self._open:
            if not channel.busy and not channel.stopping:
                channel.stopping = True
                channel.task.cancel()
