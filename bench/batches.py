"""`python -m bench.batches`: what one proxy→worker batch costs, against what one request costs.

Sends and lists reach a worker in batches (``proxy/batcher.py``), so a request's CPU is a
share of its batch's fixed cost plus its own: ``per request = own + per batch / batch
size``, for the proxy, the workers and PostgreSQL alike. The batch size is not a setting
(it is whatever queued while the last batch was in flight), but batches in flight per
worker (``DIALOGS_SEND_BATCHES_IN_FLIGHT``) change it: with two, each batch is smaller. So
each load runs under 32 wrk connections with 1 and with 2 batches in flight, in turns on
fresh clusters, and the two points (CPU per request, mean batch size from the proxy's own
histogram) give both terms for each kind of process.

``--channels`` instead compares batches sent as POSTs with batches on channels (the
default, ``DIALOGS_WORKER_CHANNELS``), in turns, lists also at one connection.

``--hop`` also measures the bare exchange the batch rides on, with no Dialogs code: CPU of
an aiohttp client POST to an aiohttp server on loopback, per exchange, against one message
each way on a WebSocket the two keep open.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import resource
import shutil
import statistics
import time
from typing import Any

import aiohttp
import uvloop
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from bench import load
from bench.harness import BenchCluster, Client, CpuSplit, list_requests, preload, send_requests
from dialogsctl.embedded import scratch_folder
from dialogsctl.net import free_port

KINDS = ("proxies", "workers", "postgres")
BATCH_METRIC = {"lists": "dialogs_proxy_list_batch_size", "sends": "dialogs_proxy_send_batch_size"}


async def _histogram(session: aiohttp.ClientSession, url: str, name: str) -> tuple[float, float]:
    """(sum, count) of a proxy histogram, over all its label values."""
    async with session.get(url + "/metrics") as response:
        text = await response.text()
    totals = {"_sum": 0.0, "_count": 0.0}
    for family in text_string_to_metric_families(text):
        if family.name == name:
            for sample in family.samples:
                suffix = sample.name.removeprefix(name)
                if suffix in totals:
                    totals[suffix] += sample.value
    return totals["_sum"], totals["_count"]


async def one_run(
    kind: str, in_flight: int, connections: int, seconds: float, channels: bool = True, one_connection: bool = False
) -> dict[str, Any]:
    """A fresh cluster (2 shards, one proxy process), warmed, then measured under wrk
    (``one_connection``: then also at one connection, for the latency)."""
    tmp = scratch_folder("dialogs-batches-")
    env = {"DIALOGS_SEND_BATCHES_IN_FLIGHT": str(in_flight), "DIALOGS_WORKER_CHANNELS": str(channels).lower()}
    cluster = BenchCluster(tmp, proxy_env=env)
    try:
        await cluster.start(proxies=1)
        url = cluster.proxy_urls[0]
        async with aiohttp.ClientSession() as session:
            if kind == "lists":
                requests = list_requests(await preload(cluster, 100_000))
            else:
                client = Client(session, cluster.proxy_urls)
                requests = send_requests([await client.user(f"u{i}") for i in range(64)])
            load.wrk(url, requests, connections, 3)
            before = await _histogram(session, url, BATCH_METRIC[kind])
            with CpuSplit(cluster) as split:
                run = load.wrk(url, requests, connections, seconds)
            after = await _histogram(session, url, BATCH_METRIC[kind])
            alone = load.wrk(url, requests, 1, seconds) if one_connection else None
        batches = after[1] - before[1]
        return {
            "in_flight": in_flight,
            "channels": channels,
            "per_second": round(run.per_second),
            "failed": run.failed,
            "mean_batch": round((after[0] - before[0]) / batches, 2) if batches else None,
            **split.to_json(run.requests),
            **({"one_connection": alone.to_json()} if alone is not None else {}),
        }
    finally:
        cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def model(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per batch and per request µs of each kind, from the medians of the two settings."""
    points = []
    for in_flight in (1, 2):
        mine = [run for run in runs if run["in_flight"] == in_flight]
        size = statistics.median(run["mean_batch"] for run in mine)
        cost = {kind: statistics.median(run["cpu_us_per_request"][kind] for run in mine) for kind in KINDS}
        points.append((size, cost))
    (size_1, cost_1), (size_2, cost_2) = points
    spread = 1 / size_2 - 1 / size_1
    per_batch = {kind: (cost_2[kind] - cost_1[kind]) / spread for kind in KINDS}
    own = {kind: cost_1[kind] - per_batch[kind] / size_1 for kind in KINDS}
    return {
        "mean_batch": {"1 in flight": size_1, "2 in flight": size_2},
        "per_batch_us": {kind: round(value) for kind, value in per_batch.items()},
        "per_request_us": {kind: round(value) for kind, value in own.items()},
        "per_batch_total_us": round(sum(per_batch.values())),
        "per_request_total_us": round(sum(own.values())),
    }


async def batches(kind: str, rounds: int, connections: int, seconds: float) -> dict[str, Any]:
    runs = []
    for _ in range(rounds):
        for in_flight in (1, 2):
            runs.append(await one_run(kind, in_flight, connections, seconds))
            print(json.dumps({kind: runs[-1]}), flush=True)
    return {"connections": connections, "runs": runs, "model": model(runs)}


async def channels(kind: str, rounds: int, connections: int, seconds: float) -> dict[str, Any]:
    """Batches as POSTs against batches on channels (``DIALOGS_WORKER_CHANNELS``), one in
    flight, fresh clusters in turns; lists also at one connection."""
    runs = []
    for _ in range(rounds):
        for on in (False, True):
            runs.append(await one_run(kind, 1, connections, seconds, channels=on, one_connection=kind == "lists"))
            print(json.dumps({kind: runs[-1]}), flush=True)
    summary: dict[str, Any] = {}
    for on, name in ((False, "posts"), (True, "channels")):
        mine = [run for run in runs if run["channels"] is on]
        summary[name] = {
            "per_second": statistics.median(run["per_second"] for run in mine),
            "cpu_us_per_request": {
                kind: round(statistics.median(run["cpu_us_per_request"][kind] for run in mine), 1) for kind in KINDS
            },
            **(
                {"one_connection_p50_ms": statistics.median(run["one_connection"]["p50_ms"] for run in mine)}
                if kind == "lists"
                else {}
            ),
        }
    summary["throughput_ratio"] = round(summary["channels"]["per_second"] / summary["posts"]["per_second"], 3)
    return {"connections": connections, "runs": runs, "summary": summary}


# The bare hop: no Dialogs code on either side.


def _hop_server(port: int) -> None:
    uvloop.install()

    async def post(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=b"[]", content_type="application/json")

    async def socket(request: web.Request) -> web.WebSocketResponse:
        channel = web.WebSocketResponse()
        await channel.prepare(request)
        async for _ in channel:
            await channel.send_bytes(b"[]")
        return channel

    async def cpu(request: web.Request) -> web.Response:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return web.Response(text=str(usage.ru_utime + usage.ru_stime))

    app = web.Application()
    app.router.add_post("/batch", post)
    app.router.add_get("/channel", socket)
    app.router.add_get("/cpu", cpu)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _hop_client(url: str, exchanges: int) -> dict[str, Any]:
    body = b'{"dialog_key":1}' * 20
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession() as session:

        async def server_cpu() -> float:
            async with session.get(url + "/cpu") as response:
                return float(await response.text())

        async def post() -> None:
            async with session.post(url + "/batch", data=body, timeout=timeout) as response:
                await response.read()

        channel = await session.ws_connect(url + "/channel")

        async def message() -> None:
            await channel.send_bytes(body)
            await channel.receive()

        results = {}
        for name, exchange in (("http_post", post), ("websocket_message", message)):
            for _ in range(500):
                await exchange()
            client, server, started = _own_cpu(), await server_cpu(), time.perf_counter()
            for _ in range(exchanges):
                await exchange()
            wall = time.perf_counter() - started
            results[name] = {
                "client_us": round((_own_cpu() - client) / exchanges * 1e6),
                "server_us": round((await server_cpu() - server) / exchanges * 1e6),
                "round_trip_us": round(wall / exchanges * 1e6),
            }
        await channel.close()
        return results


def hop(exchanges: int = 20_000) -> dict[str, Any]:
    port = free_port()
    server = multiprocessing.get_context("spawn").Process(target=_hop_server, args=(port,), daemon=True)
    server.start()
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 10
        while True:
            try:
                return uvloop.run(_hop_client(url, exchanges))
            except aiohttp.ClientConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    finally:
        server.terminate()
        server.join(5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", choices=("lists", "sends", "both"), default="both")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each setting, in turns")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--hop", action="store_true", help="also measure the bare HTTP and WebSocket exchange")
    parser.add_argument(
        "--channels", action="store_true", help="compare batches as POSTs and on channels instead of the model"
    )
    parser.add_argument("--out", help="write the results here as JSON")
    args = parser.parse_args()
    kinds = ("lists", "sends") if args.load == "both" else (args.load,)
    results: dict[str, Any] = {}
    for kind in kinds:
        measure = channels if args.channels else batches
        results[kind] = asyncio.run(measure(kind, args.rounds, args.connections, args.seconds))
    if args.hop:
        results["hop"] = hop()
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as out:
            out.write(text + "\n")


if __name__ == "__main__":
    main()
