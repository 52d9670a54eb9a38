"""Connections that send nothing, or too slowly, are closed: no client can pin a socket for ever."""

from __future__ import annotations

import asyncio
import json

import pytest
from yarl import URL

from dialogs import http
from tests.support import Cluster


@pytest.fixture
async def proxy_url(bare_cluster: Cluster) -> str:
    """A proxy whose idle timeout is one second."""
    for shard_id in bare_cluster.shard_dsns:
        await bare_cluster.start_worker(shard_id)
    await bare_cluster.start_proxy(DIALOGS_IDLE_TIMEOUT="1")
    return bare_cluster.proxy_urls[0]


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """Everything the server sent before it closed the connection, which it must do in time."""
    return await asyncio.wait_for(reader.read(), seconds)


async def _connect(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    parsed = URL(url)
    return await asyncio.open_connection(parsed.host, parsed.port)


async def test_a_connection_that_never_sends_is_closed(proxy_url: str) -> None:
    """An idle socket is closed after the idle timeout."""
    reader, writer = await _connect(proxy_url)
    try:
        assert await _closed_within(reader, 3) == b""
    finally:
        writer.close()


async def test_headers_trickling_in_do_not_keep_a_connection_open(proxy_url: str) -> None:
    """Slowloris: a header line every 0.2 s does not extend the deadline."""
    reader, writer = await _connect(proxy_url)

    async def trickle() -> None:
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        for i in range(50):
            await asyncio.sleep(0.2)
            writer.write(b"X-Slow-%d: y\r\n" % i)

    sender = asyncio.ensure_future(trickle())
    try:
        assert b"200 OK" not in await _closed_within(reader, 3)
    finally:
        sender.cancel()
        writer.close()


async def test_an_idle_keep_alive_connection_is_closed(proxy_url: str) -> None:
    """After a response, a kept-alive connection that sends nothing more is closed."""
    reader, writer = await _connect(proxy_url)
    try:
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"200 OK" in await _closed_within(reader, 3)
    finally:
        writer.close()


async def test_a_body_that_arrives_too_slowly_is_408(proxy_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Headers complete, body trickling: 408 with a JSON body once the body deadline passes."""
    monkeypatch.setattr(http, "BODY_READ_TIMEOUT", 0.5)
    reader, writer = await _connect(proxy_url)
    try:
        writer.write(
            b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
        )
        answer = await _closed_within(reader, 0.5 + http.LINGERING_SECONDS + 2)
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert json.loads(answer.partition(b"\r\n\r\n")[2])["code"] == 40801
    finally:
        writer.close()
