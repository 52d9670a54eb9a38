"""Test helpers: an in-process cluster over real PostgreSQL, and an API client that checks
every response against the service's OpenAPI document."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from aiohttp import web
from openapi_core import OpenAPI
from openapi_core.testing import MockRequest, MockResponse
from yarl import URL

from dialog_api.app import create_app as create_worker
from dialog_api.appkeys import METRICS as WORKER_METRICS
from dialog_api.settings import WorkerSettings
from dialogs import pg
from dialogs.http import LINGERING_SECONDS
from dialogs.keys import dialog_key
from dialogs.metastore import maps
from dialogs.settings import load
from dialogs.shard_map import ShardMap
from dialogsctl.net import free_port
from proxy.app import create_app as create_proxy
from proxy.appkeys import METRICS as PROXY_METRICS
from proxy.bootstrap import bootstrap
from proxy.migration.shard_sql import FENCE_LOCK
from proxy.openapi import document
from proxy.settings import ProxySettings

JWT_SECRET = "test-secret-" + "x" * 40
ADMIN_TOKEN = "test-admin-token-0123456789"
INTERNAL_SECRET = "test-internal-secret-" + "y" * 32

PROXY_ENV = {
    "DIALOGS_JWT_SECRET": JWT_SECRET,
    "DIALOGS_INTERNAL_SECRET": INTERNAL_SECRET,
    "DIALOGS_ADMIN_TOKEN": ADMIN_TOKEN,
    # Argon2 at its cheapest: the suite registers hundreds of users.
    "DIALOGS_PASSWORD_TIME_COST": "1",
    "DIALOGS_PASSWORD_MEMORY_KIB": "1024",
    "DIALOGS_POLL_INTERVAL": "0.2",
    "DIALOGS_WORKER_TTL": "3",
    "DIALOGS_FORWARD_TIMEOUT": "3",
    "DIALOGS_HEARTBEAT_INTERVAL": "0.2",
}
WORKER_ENV = {
    "DIALOGS_INTERNAL_SECRET": INTERNAL_SECRET,
    "DIALOGS_HEARTBEAT_INTERVAL": "0.2",
    "DIALOGS_POLL_INTERVAL": "0.2",
    "DIALOGS_POOL_MIN": "1",
    "DIALOGS_POOL_MAX": "8",
    "DIALOGS_QUERY_TIMEOUT": "3",
}

_OPENAPI = OpenAPI.from_dict(document())
# The course's spec (docs/spec/), as the clients generated from it read our answers.
COURSE_SPEC = Path(__file__).resolve().parents[1] / "docs" / "spec" / "otus-highload-openapi.json"
_COURSE = OpenAPI.from_dict(json.loads(COURSE_SPEC.read_text()))
_COURSE_PATHS = [
    re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", path) + "$") for path in json.loads(COURSE_SPEC.read_text())["paths"]
]


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


class Api:
    """Talks to a proxy over HTTP; validates each response against the OpenAPI document."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str) -> None:
        self.session = session
        self.base_url = base_url

    async def request(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        body: Any = None,
        raw: bytes | None = None,
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        validate: bool = True,
    ) -> Reply:
        headers = dict(headers or {})
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        if data is not None:
            headers.setdefault("Content-Type", "application/json")
        async with self.session.request(
            method, self.base_url + path, data=data, params=params, headers=headers
        ) as response:
            reply = Reply(response.status, dict(response.headers), await response.read())
        assert "X-Request-ID" in reply.headers, f"{method} {path} answered without X-Request-ID"
        if validate:
            self.validate(method, path, params, headers, data, reply)
        return reply

    def validate(
        self,
        method: str,
        path: str,
        params: dict[str, str] | None,
        headers: dict[str, str],
        data: bytes | None,
        reply: Reply,
    ) -> None:
        request = MockRequest(self.base_url, method.lower(), path, args=params or {}, headers=headers, data=data)
        content_type = reply.headers.get("Content-Type", "").split(";")[0]
        response = MockResponse(reply.body, status_code=reply.status, headers=reply.headers, content_type=content_type)
        _OPENAPI.validate_response(request, response)
        # A successful answer must also be what the course spec promises: clients generated
        # from it parse exactly these (errors beyond its few statuses are ours to define).
        if reply.status == 200 and any(pattern.match(path) for pattern in _COURSE_PATHS):
            _COURSE.validate_response(request, response)

    async def register(self, first_name: str = "Anna", second_name: str = "Test", password: str = "password-1") -> str:
        reply = await self.request(
            "POST",
            "/user/register",
            body={
                "first_name": first_name,
                "second_name": second_name,
                "password": password,
                "birthdate": "1990-05-17",
                "city": "Moscow",
                "biography": "reads",
            },
        )
        assert reply.status == 200, reply.body
        return reply.json["user_id"]

    async def login(self, user_id: str, password: str = "password-1") -> str:
        reply = await self.request("POST", "/login", body={"id": user_id, "password": password})
        assert reply.status == 200, reply.body
        return reply.json["token"]

    async def user(self, first_name: str = "Anna") -> tuple[str, str]:
        """A new user and its token."""
        user_id = await self.register(first_name)
        return user_id, await self.login(user_id)

    async def send(self, token: str, to: str, text: str, key: str | None = None) -> Reply:
        headers = {"Idempotency-Key": key} if key else None
        return await self.request("POST", f"/dialog/{to}/send", token=token, body={"text": text}, headers=headers)

    async def list(self, token: str, other: str, limit: int | None = None, before: str | None = None) -> Reply:
        params = {}
        if limit is not None:
            params["limit"] = str(limit)
        if before is not None:
            params["before"] = before
        return await self.request("GET", f"/dialog/{other}/list", token=token, params=params or None)

    async def read(self, token: str, other: str, up_to: str | None = None, body: Any = None) -> Reply:
        """A read mark up to ``up_to`` (None: the newest); ``body`` replaces the request's body."""
        if body is None and up_to is not None:
            body = {"up_to": up_to}
        return await self.request("POST", f"/dialog/{other}/read", token=token, body=body)

    async def inbox(self, token: str, limit: int | None = None, before: str | None = None) -> Reply:
        params = {}
        if limit is not None:
            params["limit"] = str(limit)
        if before is not None:
            params["before"] = before
        return await self.request("GET", "/dialogs", token=token, params=params or None)

    async def unread(self, token: str) -> Reply:
        return await self.request("GET", "/dialogs/unread", token=token)

    async def settled_inbox(
        self, token: str, expected: Callable[[list[dict[str, Any]], dict[str, int]], bool], timeout: float = 10.0
    ) -> tuple[list[dict[str, Any]], dict[str, int]]:
        """The whole inbox and the totals once ``expected(items, totals)`` holds (the inbox
        follows the dialogs asynchronously); the last seen when it never does. The items are
        read before the totals, so an apply can land between the two reads: ``expected``
        must check every half the caller goes on to assert."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            items = await self.whole_inbox(token)
            totals = await self.unread(token)
            assert totals.status == 200, totals.body
            if expected(items, totals.json) or asyncio.get_running_loop().time() > deadline:
                return items, totals.json
            await asyncio.sleep(0.05)

    async def whole_inbox(self, token: str, page: int = 1000) -> list[dict[str, Any]]:
        """Every conversation of the token's user, newest first, walking the pages."""
        items: list[dict[str, Any]] = []
        before = None
        while True:
            reply = await self.inbox(token, limit=page, before=before)
            assert reply.status == 200, reply.body
            if not reply.json:
                return items
            items.extend(reply.json)
            before = reply.json[-1]["last_message"]["id"]

    async def peer_whose_dialog_goes_to(self, user: str, shard_map: ShardMap, shard_id: str) -> tuple[str, int]:
        """A new user whose dialog with ``user`` ``shard_map`` puts on ``shard_id``: (id, dialog key)."""
        while True:
            peer = await self.register("Peer")
            key = dialog_key(uuid.UUID(user), uuid.UUID(peer))
            if shard_map.owner(key) == shard_id:
                return peer, key

    async def whole_dialog(self, token: str, other: str, page: int = 1000) -> list[dict[str, Any]]:
        """Every message of a dialog, newest first, walking the pages with ``before`` until an
        empty one (a page may hold fewer than ``page`` messages when their text is large)."""
        messages: list[dict[str, Any]] = []
        before = None
        while True:
            reply = await self.list(token, other, limit=page, before=before)
            assert reply.status == 200, reply.body
            batch = reply.json
            if not batch:
                return messages
            messages.extend(batch)
            before = batch[-1]["id"]


def metric(runner: web.AppRunner, sample: str, **labels: str) -> float:
    """A sample of a proxy's or worker's Prometheus registry, as /metrics would show it."""
    app = runner.app
    assert app is not None
    metrics = app.get(PROXY_METRICS) or app[WORKER_METRICS]
    value = metrics.registry.get_sample_value(sample, labels)
    return 0.0 if value is None else value


def worker_url(runner: web.AppRunner) -> str:
    """The base URL a worker started by ``Cluster.start_worker`` listens on."""
    site = next(iter(runner.sites))
    return site.name.rstrip("/")


async def active_map(metadata_dsn: str) -> ShardMap:
    """The active shard map, read from the metadata database."""
    con = await pg.connect(metadata_dsn)
    try:
        shard_map = await maps.active_map(con)
    finally:
        await con.close()
    assert shard_map is not None
    return shard_map


async def until(condition: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Wait until ``condition()`` holds, polling every 20 ms; fail after ``timeout`` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out waiting"
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def commits_blocked(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """Every commit on the shard waits inside its transaction: the fence lock held
    exclusively by the connection yielded (released when it closes)."""
    con = await asyncpg.connect(dsn)
    try:
        await con.execute("SELECT pg_advisory_lock($1)", FENCE_LOCK)
        yield con
    finally:
        await con.close()


async def raw_http(base_url: str, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """Send bytes no HTTP client library would (e.g. a header that is not UTF-8); the
    status and body of the answer. ``head`` is the request line and headers, without the
    blank line; Content-Length and Connection: close are added."""
    url = URL(base_url)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(head + b"\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


async def start_site(app: web.Application, port: int, idle_timeout: float) -> web.AppRunner:
    """Serve ``app`` on 127.0.0.1:``port`` as `dialogs proxy` and `dialogs worker` do."""
    runner = web.AppRunner(
        app, handle_signals=False, access_log=None, keepalive_timeout=idle_timeout, lingering_time=LINGERING_SECONDS
    )
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


@dataclass
class Cluster:
    """Proxies and workers as aiohttp apps in this process, over real PostgreSQL databases."""

    metadata_dsn: str
    shard_dsns: dict[str, str]
    session: aiohttp.ClientSession
    spare_dsns: dict[str, str] = field(default_factory=dict)
    workers: dict[str, web.AppRunner] = field(default_factory=dict)
    proxies: list[web.AppRunner] = field(default_factory=list)
    proxy_urls: list[str] = field(default_factory=list)

    @property
    def api(self) -> Api:
        return Api(self.session, self.proxy_urls[0])

    def api_for(self, index: int) -> Api:
        return Api(self.session, self.proxy_urls[index])

    async def bootstrap(self) -> None:
        await bootstrap(self.metadata_dsn, self.shard_dsns)

    def dsn(self, shard_id: str) -> str:
        return self.shard_dsns.get(shard_id) or self.spare_dsns[shard_id]

    async def start_worker(self, shard_id: str, **env: str) -> web.AppRunner:
        port = free_port()
        settings = load(
            WorkerSettings,
            {
                **WORKER_ENV,
                "DIALOGS_SHARD_ID": shard_id,
                "DIALOGS_SHARD_DSN": self.dsn(shard_id),
                "DIALOGS_METADATA_DSN": self.metadata_dsn,
                "DIALOGS_PORT": str(port),
                **env,
            },
        )
        runner = await start_site(create_worker(settings), port, settings.idle_timeout)
        self.workers[f"{shard_id}@{port}"] = runner
        return runner

    async def crash_worker(self, name: str) -> None:
        """The worker stops answering (listener and connections closed) but stays registered,
        its heartbeat going on: what a proxy sees of a hung or half-dead process."""
        runner = self.workers[name]
        for site in list(runner.sites):
            await site.stop()
        assert runner.server is not None
        await runner.server.shutdown(0)

    async def start_proxy(self, **env: str) -> web.AppRunner:
        port = free_port()
        settings = load(
            ProxySettings,
            {
                **PROXY_ENV,
                "DIALOGS_METADATA_DSN": self.metadata_dsn,
                "DIALOGS_PORT": str(port),
                **env,
            },
        )
        runner = await start_site(create_proxy(settings), port, settings.idle_timeout)
        self.proxies.append(runner)
        self.proxy_urls.append(f"http://127.0.0.1:{port}")
        await self.wait_routable(len(self.proxies) - 1)
        return runner

    async def admin(self, method: str, path: str, body: Any = None, index: int = 0) -> Reply:
        return await self.api_for(index).request(
            method, path, body=body, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        )

    async def wait_migration(
        self, migration_id: int, phases: tuple[str, ...] = ("done", "aborted"), timeout: float = 60.0
    ) -> dict[str, Any]:
        """Poll the admin API until the migration reaches one of ``phases``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            reply = await self.admin("GET", f"/admin/migrations/{migration_id}")
            assert reply.status == 200, reply.body
            if reply.json["phase"] in phases:
                return reply.json
            assert loop.time() < deadline, f"migration stuck: {reply.json}"
            await asyncio.sleep(0.05)

    async def wait_routable(self, index: int, timeout: float = 10.0) -> None:
        """Until the proxy has a map and a live worker for every shard in it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            async with self.session.get(self.proxy_urls[index] + "/health") as response:
                health = await response.json()
            if response.status == 200 and all(s["workers"] > 0 for s in health["shards"].values()):
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"proxy {index} did not become routable: {health}")

    async def stop(self) -> None:
        for runner in self.proxies + list(self.workers.values()):
            await runner.cleanup()
        self.proxies.clear()
        self.workers.clear()

    async def active_map(self) -> ShardMap:
        return await active_map(self.metadata_dsn)

    async def shard_of(self, user_a: str, user_b: str) -> str:
        return (await self.active_map()).owner(dialog_key(uuid.UUID(user_a), uuid.UUID(user_b)))

    async def start_three_shards(self, **proxy_env: str) -> None:
        """Workers for shard-1, shard-2 and the spare shard-3 (not in the map yet), and a proxy."""
        for shard_id in ("shard-1", "shard-2", "shard-3"):
            await self.start_worker(shard_id)
        await self.start_proxy(**proxy_env)

    async def fetch_meta(self, sql: str, *args: Any) -> Any:
        """One value from the metadata database."""
        con = await pg.connect(self.metadata_dsn)
        try:
            return await con.fetchval(sql, *args)
        finally:
            await con.close()

    async def stored(self, text: str) -> int:
        """Messages with ``text`` on the shards of the first map (``shard_dsns``; not the spares)."""
        total = 0
        for shard_id in self.shard_dsns:
            rows = await self.shard_fetch(shard_id, "SELECT count(*) AS n FROM messages WHERE text = $1", text)
            total += rows[0]["n"]
        return total

    async def shard_fetch(self, shard_id: str, sql: str, *args: Any) -> list[asyncpg.Record]:
        con = await pg.connect(self.dsn(shard_id))
        try:
            return await con.fetch(sql, *args)
        finally:
            await con.close()
