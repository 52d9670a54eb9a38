"""Requests to one worker travel together: whatever queued while the last batch was in flight.

Every send or list costs a proxy two HTTP exchanges without this: the client's and its own
to the worker, and the second is where the proxy's time goes (socket writes, HTTP
framing). Here each worker has a queue per kind of request (a ``Channel``: sends, list
queries); one flusher per queue posts everything queued (up to a bound) as one request to
the worker's batch endpoint for that kind, waits for the answer, and starts again. There
is no timer: an idle proxy sends a lone request at once, and under load batches grow by
themselves, as the worker's group commit does with transactions.

What a request learns is its own, exactly as if it had gone alone: its stored message or
its page, or its own error (a stale map, a moving range, a reused key), decided by
``proxy/retry_policy.py``. A batch that never reached the worker is NotConnected for each
of its requests (another worker may take them); one that broke on the way is Broken for
each (sends may have been stored: the clients retry with their Idempotency-Keys; lists
are repeated).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import aiohttp
import orjson
from yarl import URL

from dialogs import errors, wire
from proxy.retry_policy import Answered, Attempt, Broken, ErrorAnswer, NotConnected

Item = TypeVar("Item")


@dataclass(frozen=True, slots=True)
class Channel(Generic[Item]):
    """One kind of batched request: the worker's path, how a batch is encoded, and how its
    answer is read into one outcome per item (a ValueError: the answer is broken)."""

    path: str
    encode: Callable[[list[Item]], bytes]
    decode: Callable[[bytes, int], list[Attempt]]
    observe: Callable[[int, float], None] = lambda size, seconds: None


def _items_json(items: list[Any]) -> bytes:
    return orjson.dumps([item.to_json() for item in items])


def _send_answers(body: bytes, count: int) -> list[Attempt]:
    answers = orjson.loads(body)
    if not isinstance(answers, list) or len(answers) != count:
        raise ValueError("a batch's answer is an array of one answer per send")
    return [_attempt(wire.send_answer_from_json(answer)) for answer in answers]


def _page_answers(body: bytes, count: int) -> list[Attempt]:
    return [_attempt(answer) for answer in wire.decode_pages(body, count)]


def _attempt(answer: wire.SendResult | wire.Page | errors.DialogsError) -> Attempt:
    return ErrorAnswer(answer) if isinstance(answer, errors.DialogsError) else Answered(answer)


def sends(observe: Callable[[int, float], None] = lambda size, seconds: None) -> Channel[wire.SendItem]:
    return Channel(wire.INTERNAL_BATCH_PATH, _items_json, _send_answers, observe)


def lists(observe: Callable[[int, float], None] = lambda size, seconds: None) -> Channel[wire.ListQuery]:
    return Channel(wire.INTERNAL_PAGES_PATH, _items_json, _page_answers, observe)


@dataclass
class _Queue:
    items: list[tuple[Any, asyncio.Future[Attempt]]] = field(default_factory=list)
    flushers: set[asyncio.Task[None]] = field(default_factory=set)


# How long a connection to a worker may take to be made. A worker whose host is gone (a
# killed container: its address answers nothing) must cost this, not the whole call's
# timeout, and count as never connected: the request then goes to the next worker.
CONNECT_TIMEOUT = 1.0
# Failures that happen before a request is sent: nothing can have been applied.
NOT_CONNECTED: tuple[type[BaseException], ...] = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)


def worker_timeout(total: float) -> aiohttp.ClientTimeout:
    """The client timeout of one proxy→worker call of ``total`` seconds."""
    return aiohttp.ClientTimeout(total=total, sock_connect=min(CONNECT_TIMEOUT, total))


class Batcher:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        headers: dict[str, str],
        timeout: float,
        batch_max: int,
        in_flight: int = 1,
    ) -> None:
        self._session = session
        self._headers = {**headers, "Content-Type": "application/json"}
        self._timeout = worker_timeout(timeout)
        self._batch_max = batch_max
        self._in_flight = in_flight
        self._queues: dict[tuple[str, str], _Queue] = {}

    async def submit(self, channel: Channel[Item], worker_url: str, item: Item) -> Attempt:
        """Queue ``item`` for ``worker_url`` on ``channel`` and wait for its own outcome."""
        queue = self._queues.setdefault((worker_url, channel.path), _Queue())
        future: asyncio.Future[Attempt] = asyncio.get_running_loop().create_future()
        queue.items.append((item, future))
        # A flusher that has just returned is done() at once, but leaves the set only when
        # its done-callbacks run, later: count the live ones, or this item could be stranded.
        queue.flushers = {flusher for flusher in queue.flushers if not flusher.done()}
        if len(queue.flushers) < self._in_flight:
            queue.flushers.add(asyncio.ensure_future(self._flush(channel, worker_url, queue)))
        return await future

    async def close(self) -> None:
        flushers = [flusher for queue in self._queues.values() for flusher in queue.flushers]
        for flusher in flushers:
            flusher.cancel()
        await asyncio.gather(*flushers, return_exceptions=True)

    async def _flush(self, channel: Channel[Item], worker_url: str, queue: _Queue) -> None:
        url = URL(worker_url + channel.path, encoded=True)
        loop = asyncio.get_running_loop()
        while queue.items:
            batch = [(item, future) for item, future in queue.items[: self._batch_max] if not future.done()]
            del queue.items[: self._batch_max]
            if not batch:
                continue
            started = loop.time()
            try:
                outcomes = await self._post(channel, url, [item for item, _ in batch])
            except BaseException:
                for _, future in batch:
                    if not future.done():
                        future.set_result(Broken())
                raise
            channel.observe(len(batch), loop.time() - started)
            for (_, future), outcome in zip(batch, outcomes, strict=True):
                if not future.done():  # a client that went away; its request was carried out all the same
                    future.set_result(outcome)

    async def _post(self, channel: Channel[Item], url: URL, items: list[Item]) -> list[Attempt]:
        try:
            async with self._session.post(
                url, data=channel.encode(items), headers=self._headers, timeout=self._timeout
            ) as response:
                body = await response.read()
        except NOT_CONNECTED:
            return [NotConnected()] * len(items)
        except (aiohttp.ClientError, TimeoutError):
            return [Broken()] * len(items)
        if response.status != 200:
            # The whole batch was refused (a bad secret, a worker shutting down): nothing done.
            error = wire.error_from_response(response.status, body, response.headers.get("Retry-After"))
            return [ErrorAnswer(error)] * len(items)
        try:
            return channel.decode(body, len(items))
        except ValueError:
            return [Broken()] * len(items)  # a worker or a hop in between broke it: maybe stored
