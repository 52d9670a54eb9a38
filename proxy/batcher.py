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

A batch travels on a channel (``dialogs/wire.py``, "Channels"): a WebSocket to the worker's
batch path that stays open, one batch at a time, as many per queue as batches in flight.
It saves the HTTP exchange's framing on both sides, the largest cost of a batch after the
SQL (docs/capacity.md). A batch that meets the worker's GOING_AWAY close was not carried
out: it goes again on a new channel (``retry_policy.after_channel_end`` decides), and a
channel that cannot be opened at all is NotConnected, as a POST that never connected. A
worker that answers the upgrade with an HTTP error (a release without channels, a wrong
secret) gets the batch as a POST instead, and POSTs for a while (``POST_ONLY_SECONDS``).
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
from proxy import retry_policy
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


def _unread_answers(body: bytes, count: int) -> list[Attempt]:
    return [_attempt(answer) for answer in wire.decode_unread(body, count)]


def _attempt(answer: wire.SendResult | wire.Page | wire.UnreadTotals | errors.DialogsError) -> Attempt:
    return ErrorAnswer(answer) if isinstance(answer, errors.DialogsError) else Answered(answer)


def sends(observe: Callable[[int, float], None] = lambda size, seconds: None) -> Channel[wire.SendItem]:
    return Channel(wire.INTERNAL_BATCH_PATH, _items_json, _send_answers, observe)


def lists(observe: Callable[[int, float], None] = lambda size, seconds: None) -> Channel[wire.ListQuery]:
    return Channel(wire.INTERNAL_PAGES_PATH, _items_json, _page_answers, observe)


def inbox_pages() -> Channel[wire.InboxQuery]:
    return Channel(wire.INTERNAL_INBOX_PAGES_PATH, _items_json, _page_answers)


def unread_totals() -> Channel[wire.InboxQuery]:
    return Channel(wire.INTERNAL_UNREAD_BATCH_PATH, _items_json, _unread_answers)


class _Link:
    """One open channel: a WebSocket carrying one batch at a time, with a reader of its own
    so that a close while idle is seen (and answered) at once."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.idle_since = 0.0  # loop time it last went back to its queue's idle links
        self._answer: asyncio.Future[aiohttp.WSMessage] | None = None
        self._reader = asyncio.ensure_future(self._read())

    @property
    def open(self) -> bool:
        return not self._reader.done()

    async def exchange(self, body: bytes, deadline: float) -> aiohttp.WSMessage:
        """Send one batch and wait for the message that answers it (a close, if the
        channel closed first). Raises ConnectionError when the batch could not be written
        (nothing sent) and TimeoutError at loop time ``deadline``, writing or waiting."""
        answer = self._answer = asyncio.get_running_loop().create_future()
        try:
            if not self.open:
                raise ConnectionResetError("the channel is closed")
            async with asyncio.timeout_at(deadline):
                await self.ws.send_bytes(body)
                return await answer
        finally:
            self._answer = None

    async def _read(self) -> None:
        try:
            while True:
                message = await self.ws.receive()
                answer = self._answer
                if answer is None or answer.done() or message.type is not aiohttp.WSMsgType.BINARY:
                    break  # a close, a broken connection, or a message nobody asked for
                answer.set_result(message)
        except BaseException:
            message = _CLOSED  # never an earlier batch's answer
            raise
        finally:
            if self._answer is not None and not self._answer.done():
                self._answer.set_result(message)
        await self.ws.close()  # a no-op once closed (autoclose answered a close already)

    async def close(self) -> None:
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
        await self.ws.close()


_CLOSED = aiohttp.WSMessage(aiohttp.WSMsgType.CLOSED, None, None)
# A channel's close waits this long for the worker's close in return.
_CHANNEL_TIMEOUT = aiohttp.ClientWSTimeout(ws_receive=None, ws_close=1.0)

# An idle channel older than this is closed rather than used: shorter than the workers'
# idle timeout (75 s by default), as the POSTs' keep-alive is, so a channel is rarely
# used as its worker closes it, and one to a host that vanished is not kept for good.
LINK_IDLE_SECONDS = 30.0

# A worker that answered a channel's upgrade with an HTTP error gets POSTs for this long
# before a channel is tried again (it may have been upgraded, or have finished starting).
POST_ONLY_SECONDS = 30.0


@dataclass
class _Queue:
    items: list[tuple[Any, asyncio.Future[Attempt]]] = field(default_factory=list)
    flushers: set[asyncio.Task[None]] = field(default_factory=set)
    idle: list[_Link] = field(default_factory=list)  # open channels no batch is on
    post_until: float = 0.0  # loop time until which batches go as POSTs


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
        channels: bool = True,
    ) -> None:
        self._session = session
        self._channel_headers = dict(headers)
        self._headers = {**headers, "Content-Type": "application/json"}
        self._timeout = worker_timeout(timeout)
        self._seconds = timeout
        self._batch_max = batch_max
        self._in_flight = in_flight
        self._channels = channels
        # Channels share the session's connections; their handshake is bounded like a
        # POST's connect, and nothing bounds the life of the channel after it.
        self._channel_session = aiohttp.ClientSession(
            connector=session.connector,
            connector_owner=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT),
        )
        self._closing: set[asyncio.Future[None]] = set()
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
        links = [link.close() for queue in self._queues.values() for link in queue.idle]
        await asyncio.gather(*links, *self._closing, return_exceptions=True)
        await self._channel_session.close()

    @property
    def open_channels(self) -> int:
        """Channels open and idle (the ones carrying a batch are not counted)."""
        return sum(link.open for queue in self._queues.values() for link in queue.idle)

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
                outcomes = await self._deliver(channel, url, queue, [item for item, _ in batch])
            except BaseException:
                for _, future in batch:
                    if not future.done():
                        future.set_result(Broken())
                raise
            channel.observe(len(batch), loop.time() - started)
            for (_, future), outcome in zip(batch, outcomes, strict=True):
                if not future.done():  # a client that went away; its request was carried out all the same
                    future.set_result(outcome)

    async def _deliver(self, channel: Channel[Item], url: URL, queue: _Queue, items: list[Item]) -> list[Attempt]:
        """One batch to the worker, on a channel or as a POST; an outcome per item."""
        if self._channels and asyncio.get_running_loop().time() >= queue.post_until:
            return await self._on_channel(channel, url, queue, items)
        return await self._post(channel, url, items)

    async def _on_channel(self, channel: Channel[Item], url: URL, queue: _Queue, items: list[Item]) -> list[Attempt]:
        """One batch on a channel of ``queue`` (an idle one, else a new one), within one
        call's timeout in all."""
        body = channel.encode(items)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._seconds
        while True:
            link = self._idle_link(queue, loop.time())
            reused = link is not None
            if link is None:
                opened = await self._open(url, deadline)
                if opened is None:
                    queue.post_until = loop.time() + POST_ONLY_SECONDS
                    return await self._post(channel, url, items)
                if isinstance(opened, NotConnected):
                    return [opened] * len(items)
                link = opened
            if loop.time() >= deadline:
                # Nothing sent yet, and no time left to send it: as a connection never made
                # (written now, it would be carried out and reported Broken).
                self._close_later(link)
                return [NotConnected()] * len(items)
            written = False
            try:
                message = await link.exchange(body, deadline)
                written = True
            except ConnectionError:  # the batch was not written: nothing was sent
                message = _CLOSED
            except TimeoutError:
                self._close_later(link)  # a late answer must not be read as the next batch's
                return [Broken()] * len(items)
            except BaseException:
                self._close_later(link)  # cancelled (the proxy closing): the link goes with it
                raise
            if message.type is aiohttp.WSMsgType.BINARY:
                link.idle_since = loop.time()
                queue.idle.append(link)
                return self._answers(channel, message.data, len(items))
            going_away = message.type is aiohttp.WSMsgType.CLOSE and message.data == aiohttp.WSCloseCode.GOING_AWAY
            step = retry_policy.after_channel_end(going_away, written, reused)
            self._close_later(link)
            if isinstance(step, retry_policy.Resend):
                continue
            return [step] * len(items)

    def _idle_link(self, queue: _Queue, now: float) -> _Link | None:
        """An idle channel of ``queue`` fit to carry a batch; those closed meanwhile, or idle
        too long, are dropped."""
        while queue.idle:
            link = queue.idle.pop()
            if link.open and now - link.idle_since < LINK_IDLE_SECONDS:
                return link
            self._close_later(link)
        return None

    async def _open(self, url: URL, deadline: float) -> _Link | NotConnected | None:
        """A new channel to ``url``; NotConnected if none could be made by loop time
        ``deadline`` (no batch was sent on it), None if the worker answered the upgrade with
        an HTTP error."""
        try:
            async with asyncio.timeout_at(deadline):
                ws = await self._channel_session.ws_connect(
                    url,
                    headers=self._channel_headers,
                    autoclose=True,
                    autoping=True,
                    max_msg_size=0,  # a worker's answer is trusted, as a POST's body is
                    timeout=_CHANNEL_TIMEOUT,
                )
        except aiohttp.WSServerHandshakeError:
            return None
        except (aiohttp.ClientError, TimeoutError, OSError):
            return NotConnected()
        return _Link(ws)

    def _close_later(self, link: _Link) -> None:
        closing = asyncio.ensure_future(link.close())
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)

    def _answers(self, channel: Channel[Item], message: bytes, count: int) -> list[Attempt]:
        try:
            status, body = wire.channel_answer(message)
            if status != 200:
                # The whole batch was refused (one the worker could not read): nothing done.
                return [ErrorAnswer(wire.error_from_json(status, orjson.loads(body)))] * count
            return channel.decode(body, count)
        except ValueError:
            return [Broken()] * count  # a worker broke it: maybe stored

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
