"""A channel's proxy end (``proxy/batcher.py`` ``_Link``): each batch gets the message that
answers it, never another batch's. The socket here is a stand-in that delivers what the
test hands it: the cases are a connection's failures, which a real worker cannot be made
to produce on demand (tests/test_channels.py covers the channel against real workers)."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from proxy.batcher import _Link

pytestmark = pytest.mark.timeout(10)


class _Socket:
    """What ``_Link`` uses of a client WebSocket; ``incoming`` holds what ``receive`` returns
    (or raises), in order."""

    def __init__(self) -> None:
        self.incoming: asyncio.Queue[aiohttp.WSMessage | BaseException] = asyncio.Queue()
        self.sent: list[bytes] = []
        self.closed = False

    async def receive(self) -> aiohttp.WSMessage:
        item = await self.incoming.get()
        if isinstance(item, BaseException):
            raise item
        return item

    async def send_bytes(self, data: bytes) -> None:
        self.sent.append(data)

    async def close(self) -> bool:
        self.closed = True
        return True


def _binary(data: bytes) -> aiohttp.WSMessage:
    return aiohttp.WSMessage(aiohttp.WSMsgType.BINARY, data, None)


async def _exchange(link: _Link, socket: _Socket, body: bytes, then: aiohttp.WSMessage | BaseException) -> object:
    deadline = asyncio.get_running_loop().time() + 5
    exchange = asyncio.ensure_future(link.exchange(body, deadline))
    while body not in socket.sent:
        await asyncio.sleep(0)
    socket.incoming.put_nowait(then)
    return await exchange


async def test_a_reader_that_fails_hands_the_waiting_batch_a_close_not_an_earlier_answer() -> None:
    socket = _Socket()
    link = _Link(socket)  # type: ignore[arg-type]
    first = await _exchange(link, socket, b"one", _binary(b"answer to one"))
    assert first == _binary(b"answer to one")
    second = await _exchange(link, socket, b"two", ConnectionResetError("connection lost"))
    assert isinstance(second, aiohttp.WSMessage) and second.type is aiohttp.WSMsgType.CLOSED
    await asyncio.gather(link._reader, return_exceptions=True)
    assert not link.open


async def test_a_close_while_a_batch_waits_is_that_batchs_answer() -> None:
    socket = _Socket()
    link = _Link(socket)  # type: ignore[arg-type]
    going_away = aiohttp.WSMessage(aiohttp.WSMsgType.CLOSE, aiohttp.WSCloseCode.GOING_AWAY, "")
    assert await _exchange(link, socket, b"one", going_away) == going_away
    await asyncio.gather(link._reader, return_exceptions=True)
    assert not link.open and socket.closed


async def test_a_message_nobody_asked_for_ends_the_channel() -> None:
    socket = _Socket()
    link = _Link(socket)  # type: ignore[arg-type]
    socket.incoming.put_nowait(_binary(b"unasked"))
    await asyncio.wait_for(asyncio.gather(link._reader, return_exceptions=True), 5)
    assert not link.open and socket.closed
    with pytest.raises(ConnectionError):
        await link.exchange(b"too late", asyncio.get_running_loop().time() + 5)
