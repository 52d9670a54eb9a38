"""`python -m bench.lean_front`: how much of a list's proxy CPU is aiohttp's public server.

A measuring prototype, not part of the service. One process runs the real proxy app
(aiohttp, on ``DIALOGS_PORT``) and, in the same event loop, a bare asyncio protocol with
httptools's parser (on ``LEAN_PORT``) that serves only ``GET /dialog/{user_id}/list`` (no
query parameters) through the same token check, validation and forwarder, answering
with the page's bytes. It leaves out what a public server must have (pipelined requests
answered in order, request metrics and logs, idle and body limits, every other route),
so its figure bounds what a lean front could save from above.

The bench cluster (2 shards, one proxy process) and the prototype's process share the
workers; wrk loads one front at a time, in turns, at 32 connections and then at one.
It needs httptools, which the service does not: `pip install httptools`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from bench import load
from bench.harness import BenchCluster, cpu_seconds, list_requests, preload
from dialogs import errors, wire
from dialogs.http import new_request_id
from dialogs.keys import dialog_key
from dialogsctl.embedded import scratch_folder
from dialogsctl.net import free_port
from proxy import validation
from proxy.app import create_app
from proxy.appkeys import FORWARDER, KNOWN_USERS, TOKENS
from proxy.settings import ProxySettings

try:
    import httptools
except ImportError:  # not a dependency of the service
    sys.exit("bench.lean_front needs httptools: pip install httptools")


class ListFront(asyncio.Protocol):
    """One client connection: each request parsed by httptools, answered by ``_answer``."""

    def __init__(self, app: web.Application) -> None:
        self._app = app
        self._url = b""
        self._authorization: str | None = None
        self._answering: set[asyncio.Future[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport: Any = transport  # uvloop's transport is not an asyncio.Transport subclass
        self._parser = httptools.HttpRequestParser(self)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self._transport.close()

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"authorization":
            self._authorization = value.decode("latin-1")

    def on_message_complete(self) -> None:
        url, authorization = self._url, self._authorization
        self._url, self._authorization = b"", None
        answering = asyncio.ensure_future(self._answer(url, authorization))
        self._answering.add(answering)
        answering.add_done_callback(self._answering.discard)

    async def _answer(self, url: bytes, authorization: str | None) -> None:
        request_id = new_request_id()
        try:
            parts = httptools.parse_url(url).path.decode().split("/")
            if len(parts) != 4 or parts[1] != "dialog" or parts[3] != "list":
                raise errors.NotFound("no such route")
            if authorization is None or not authorization.startswith("Bearer "):
                raise errors.Unauthorized("missing bearer token")
            viewer = self._app[TOKENS].verify(authorization[7:])
            other = validation.user_id(parts[2])
            query = wire.ListQuery(
                dialog_key(viewer, other),
                viewer,
                other,
                validation.list_before(None),
                validation.list_limit(None),
                None,
                request_id,
            )
            page = await self._app[FORWARDER].list(query)
            if page.empty:
                await self._app[KNOWN_USERS].ensure(other)
            status, body = 200, page.body
        except errors.DialogsError as exc:
            status, body = exc.status, orjson.dumps(wire.error_json(exc, request_id))
        self._transport.write(
            b"HTTP/1.1 %d X\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: %d\r\n"
            b"X-Request-Id: %s\r\n\r\n%s" % (status, len(body), request_id.encode(), body)
        )


async def serve() -> None:
    """The proxy app on DIALOGS_PORT and the list front on LEAN_PORT, until killed."""
    from dialogs.serve import settings_or_exit

    app = create_app(settings_or_exit(ProxySettings))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", int(os.environ["DIALOGS_PORT"])).start()
    await asyncio.get_running_loop().create_server(lambda: ListFront(app), "127.0.0.1", int(os.environ["LEAN_PORT"]))
    await asyncio.Event().wait()


async def compare(rounds: int, seconds: float) -> list[dict[str, Any]]:
    tmp = scratch_folder("dialogs-lean-")
    cluster = BenchCluster(tmp)
    front: subprocess.Popen[bytes] | None = None
    try:
        await cluster.start(proxies=1)
        requests = list_requests(await preload(cluster, 100_000))
        port, lean_port = free_port(), free_port()
        env = {**os.environ, **cluster.proxies[0].env, "DIALOGS_PORT": str(port), "LEAN_PORT": str(lean_port)}
        with open(os.environ.get("LEAN_LOG", tmp / "lean.log"), "wb") as log:
            front = subprocess.Popen([sys.executable, "-m", "bench.lean_front", "--serve"], env=env, stderr=log)
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        aiohttp_proxy = cluster.proxies[0].process
        assert aiohttp_proxy is not None
        fronts = {
            "aiohttp": (cluster.proxy_urls[0], aiohttp_proxy.pid),
            "lean": (f"http://127.0.0.1:{lean_port}", front.pid),
        }
        for url, _ in fronts.values():
            load.wrk(url, requests, 32, 3)
        runs = []
        for _ in range(rounds):
            for name, (url, pid) in fronts.items():
                before = cpu_seconds([pid])
                run = load.wrk(url, requests, 32, seconds)
                cpu = cpu_seconds([pid]) - before
                alone = load.wrk(url, requests, 1, seconds / 2, threads=1)
                runs.append(
                    {
                        "front": name,
                        "per_second": round(run.per_second),
                        "failed": run.failed,
                        "proxy_cpu_us_per_list": round(1e6 * cpu / run.requests, 1),
                        "one_connection_p50_ms": alone.p50_ms,
                    }
                )
                print(json.dumps(runs[-1]), flush=True)
        return runs
    finally:
        if front is not None:
            front.terminate()
            front.wait(10)
        cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", action="store_true", help="run the prototype's process (used by the comparison)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--out", type=Path, help="also write the runs to this JSON file")
    args = parser.parse_args()
    if args.serve:
        import uvloop

        uvloop.install()
        asyncio.run(serve())
        return
    runs = asyncio.run(compare(args.rounds, args.seconds))
    results = {"connections": 32, "runs": runs, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print(json.dumps(results, indent=1))
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
