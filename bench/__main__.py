"""`python -m bench` (or `make bench`): the brief's figures, each against a baseline of the same run.

1. send throughput through the proxies vs raw single-row INSERTs into one shard, same concurrency
2. list latency the proxy and worker add over the same query run directly (p50)
3. resharding copy rate vs PostgreSQL's own COPY between the same two servers
4. the write pause at cutover, under load (client-side latency of sends in flight during it),
   once with headroom (8 senders) and once with the machine saturated (32 senders)

Results go to stdout and bench/results/latest.json. Servers run with fsync on.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import jwt

from bench import load
from bench.harness import JWT_SECRET, BenchCluster, Client, preload, psql_copy, quantile
from dialogsctl.embedded import scratch_folder
from dialogsctl.net import free_port

COLUMNS = "dialog_key, user_lo, user_hi, id, from_lo, text, created_at, idempotency_key"


RAW_INSERT = """
\\set k random(1, 9223372036854775806)
INSERT INTO bench_raw (dialog_key, user_lo, user_hi, id, from_lo, text, created_at)
SELECT :k, least(a, b), greatest(a, b), :k, true, 'hello, this is a message', now()
FROM (SELECT gen_random_uuid() AS a, gen_random_uuid() AS b) AS pair;
"""

# The worker's list query (dialog_api/storage.py) for a random preloaded dialog of the shard.
LIST_DIRECT = """
\\set i random(1, :dialogs)
SELECT m.id, m.user_lo, m.user_hi, m.from_lo, m.text, m.created_at
FROM bench_dialogs d, LATERAL (
    SELECT * FROM messages
    WHERE dialog_key = d.dialog_key AND user_lo = d.lo AND user_hi = d.hi AND id < 9223372036854775807
    ORDER BY id DESC LIMIT 100
) m
WHERE d.i = :i;
"""

SEND_BODY = json.dumps({"text": "hello, this is a message"})


async def raw_inserts(dsn: str, clients: int, seconds: float) -> load.Load:
    """Single-row autocommit INSERTs into a scratch copy of the messages table (pgbench)."""
    await _sql(dsn, "DROP TABLE IF EXISTS bench_raw; CREATE TABLE bench_raw (LIKE messages INCLUDING ALL)")
    try:
        return load.pgbench(dsn, RAW_INSERT, clients, seconds)
    finally:
        await _sql(dsn, "DROP TABLE bench_raw")


async def _sql(dsn: str, sql: str) -> None:
    con = await asyncpg.connect(dsn)
    try:
        await con.execute(sql)
    finally:
        await con.close()


def send_requests(users: list[tuple[str, str]], count: int = 2000) -> list[dict[str, object]]:
    """Sends between random pairs of registered users (a recipient must exist)."""
    rng = random.Random(7)
    requests = []
    for _ in range(count):
        (_, token), (other, _) = rng.sample(users, 2)
        requests.append({"method": "POST", "path": f"/dialog/{other}/send", "body": SEND_BODY,
                         "headers": {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}})
    return requests


def list_requests(dialogs: list[tuple[int, Any, Any]], count: int = 2000) -> list[dict[str, object]]:
    """Lists of random preloaded dialogs, by either participant (tokens minted with the bench's key)."""
    rng = random.Random(8)
    requests = []
    for _, lo, hi in rng.sample(dialogs, min(count, len(dialogs))):
        viewer, other = (lo, hi) if rng.random() < 0.5 else (hi, lo)
        token = jwt.encode({"sub": str(viewer), "exp": int(time.time()) + 3600}, JWT_SECRET, algorithm="HS256")
        requests.append({"method": "GET", "path": f"/dialog/{other}/list",
                         "headers": {"Authorization": f"Bearer {token}"}})
    return requests


def monolith_sends(dsn: str, requests: list[dict[str, object]], connections: int, seconds: float) -> load.Load:
    """The naive single-node monolith (bench/monolith.py) under the same sends."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.monolith", "--dsn", dsn, "--port", str(port), "--secret", JWT_SECRET],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url + "/health", timeout=1):
                    break
            except OSError:
                time.sleep(0.1)
        return load.wrk(url, requests, connections, seconds)
    finally:
        process.terminate()
        process.wait(10)


def list_direct(dsn: str, dialogs: int, clients: int, seconds: float) -> load.Load:
    return load.pgbench(dsn, LIST_DIRECT, clients, seconds, {"dialogs": str(dialogs)})


async def copy_rates(cluster: BenchCluster, client: Client) -> dict[str, Any]:
    """Add shard-3 (no other load): its copy phase's rate vs psql COPY between the same servers."""
    source, target = cluster.dsn("shard-1"), cluster.dsn("shard-3")
    con = await asyncpg.connect(source)
    rows = await con.fetchval("SELECT count(*) FROM messages")
    await con.close()
    # The target gets the shard schema when the migration prepares it; the baseline needs a table now.
    con = await asyncpg.connect(target)
    await con.execute(
        "CREATE TABLE bench_copy (dialog_key bigint, user_lo uuid, user_hi uuid, id bigint, from_lo boolean,"
        " text text, created_at timestamptz, idempotency_key text, PRIMARY KEY (dialog_key, user_lo, user_hi, id))"
    )
    await con.close()
    baseline_seconds = psql_copy(source, target, f"SELECT {COLUMNS} FROM messages", f"bench_copy ({COLUMNS})")
    con = await asyncpg.connect(target)
    await con.execute("DROP TABLE bench_copy")
    await con.close()

    cluster.start_worker("shard-3")
    status, migration = await client.admin("POST", "/admin/shards", {"shard_id": "shard-3", "dsn": target})
    assert status == 202, migration
    seen = await client.follow(migration["migration_id"])
    result = seen["result"]
    assert result["phase"] == "done", result
    copy_seconds = seen["catchup"] - seen["copy"]
    return {
        "baseline_rows": rows,
        "baseline_seconds": baseline_seconds,
        "baseline_rows_per_second": rows / baseline_seconds,
        "migration_rows": result["rows_copied"],
        "migration_copy_seconds": copy_seconds,
        "migration_rows_per_second": result["rows_copied"] / copy_seconds,
        "ranges": result["ranges_total"],
    }


async def cutover_pause(client: Client, users: list[tuple[str, str]], concurrency: int,
                        method: str, path: str, body: Any = None) -> dict[str, Any]:
    """Run a migration while `concurrency` senders write; latency of sends in flight at its cutover."""
    stop = asyncio.Event()
    samples: list[tuple[float, float, int]] = []

    async def send_forever(index: int) -> None:
        rng = random.Random(100 + index)
        while not stop.is_set():
            (_, token), (other, _) = rng.sample(users, 2)
            started = time.monotonic()
            status, _ = await client.call("POST", f"/dialog/{other}/send", proxy=index, token=token,
                                          body={"text": "during the cutover"})
            samples.append((started, time.monotonic(), status))

    senders = [asyncio.ensure_future(send_forever(i)) for i in range(concurrency)]
    await asyncio.sleep(2)
    migration_started = time.monotonic()
    status, migration = await client.admin(method, path, body)
    assert status == 202, migration
    seen = await client.follow(migration["migration_id"])
    await asyncio.sleep(1)
    stop.set()
    await asyncio.gather(*senders)
    result = seen["result"]
    if result["phase"] != "done":
        raise RuntimeError(f"the migration did not finish: {result}")
    window = (seen["cutover"], (seen["cleanup"] if "cleanup" in seen else seen["done"]) + 0.05)
    during = [end - start for start, end, _ in samples if start <= window[1] and end >= window[0]]
    before = [end - start for start, end, _ in samples if end < migration_started]
    return {
        "migration": f"{result['kind']} {result['shard_id']}",
        "senders_in_flight": concurrency,
        "sends": len(samples),
        "failed": sum(1 for *_, s in samples if s != 200),
        "freeze_to_flip_ms": result["last_pause_ms"],
        "cutover_attempts": result["cutover_attempts"],
        "sends_overlapping_cutover": len(during),
        "pause_p50_ms": quantile(during, 0.5) * 1000,
        "pause_p99_ms": quantile(during, 0.99) * 1000,
        "pause_max_ms": max(during) * 1000 if during else float("nan"),
        "steady_p99_ms": quantile(before, 0.99) * 1000,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    tmp = scratch_folder("dialogs-bench-")
    try:
        cluster = BenchCluster(tmp)
        try:
            print("starting servers, workers and proxies…", flush=True)
            await cluster.start()
            dialogs = await preload(cluster, args.rows)
            connector = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(connector=connector) as session:
                client = Client(session, cluster.proxy_urls)
                users = [await client.user(f"u{i}") for i in range(64)]

                proxy_url = cluster.proxy_urls[0]
                sends = send_requests(users)
                print("1/4 send throughput (wrk, pgbench, the naive monolith)…", flush=True)
                raw = await raw_inserts(cluster.dsn("shard-1"), args.concurrency, args.seconds)
                monolith = monolith_sends(cluster.dsn("shard-1"), sends, args.concurrency, args.seconds)
                processes = {"proxy": cluster.proxies[0], **{f"worker {s}": w for s, w in cluster.workers.items()}}
                with load.PeakRss({name: child.process.pid for name, child in processes.items()
                                   if child.process is not None}) as send_rss:
                    proxied = load.wrk(proxy_url, sends, args.concurrency, args.seconds)

                print("2/4 lists (wrk through a proxy, pgbench directly)…", flush=True)
                lists = list_requests(dialogs)
                shard_dialogs = await _count(cluster.dsn("shard-1"), "SELECT count(*) FROM bench_dialogs")
                list_runs = {
                    "direct_1": list_direct(cluster.dsn("shard-1"), shard_dialogs, 1, args.seconds),
                    "direct_32": list_direct(cluster.dsn("shard-1"), shard_dialogs, args.concurrency, args.seconds),
                    "proxy_1": load.wrk(proxy_url, lists, 1, args.seconds, threads=1),
                    "proxy_32": load.wrk(proxy_url, lists, args.concurrency, args.seconds),
                }

                copy: dict[str, Any] | None = None
                pauses: list[dict[str, Any]] = []
                runner_log: list[str] = []
                if not args.skip_resharding:
                    print("3/4 resharding copy rate…", flush=True)
                    copy = await copy_rates(cluster, client)

                    print("4/4 cutover pause under load…", flush=True)
                    # Once with headroom, once with the machine saturated (see steady_p99_ms).
                    pauses = [
                        await cutover_pause(client, users, args.pause_concurrency, "DELETE", "/admin/shards/shard-3"),
                        await cutover_pause(client, users, args.concurrency, "POST", "/admin/shards",
                                            {"shard_id": "shard-3", "dsn": cluster.dsn("shard-3")}),
                    ]
                    runner_log = cluster.cutover_log()
        finally:
            cluster.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version()},
        "send_throughput": {
            "connections": args.concurrency,
            "proxy": proxied.to_json(),
            "naive_monolith": monolith.to_json(),
            "raw_insert_pgbench": raw.to_json(),
            "peak_rss_mib": {name: round(mib, 1) for name, mib in send_rss.peak_mib.items()},
            "ratio_to_monolith": round(proxied.per_second / monolith.per_second, 3),
            "ratio_to_raw_insert": round(proxied.per_second / raw.per_second, 3),
            "target": ">= 1.5x the monolith and >= 0.4x raw INSERTs (aim: 1.0x raw)",
        },
        "lists": {
            **{name: run.to_json() for name, run in list_runs.items()},
            "added_p50_ms_at_1": round(list_runs["proxy_1"].p50_ms - list_runs["direct_1"].p50_ms, 3),
            "throughput_ratio_at_32": round(list_runs["proxy_32"].per_second / list_runs["direct_32"].per_second, 3),
            "target": "added p50 <= 1.0 ms at 1 connection; >= 0.25x direct throughput at 32",
        },
        "copy_rate": None if copy is None else {
            **{k: round(v, 3) if isinstance(v, float) else v for k, v in copy.items()},
            "ratio": round(copy["migration_rows_per_second"] / copy["baseline_rows_per_second"], 3),
            "target": ">= 0.5",
        },
        "cutover_pause": {
            "runs": [{k: round(v, 1) if isinstance(v, float) else v for k, v in pause.items()} for pause in pauses],
            "runner_log": runner_log,
            "target": "p99 < 250 ms, max < 1000 ms, no failed sends",
        },
    }


async def _count(dsn: str, sql: str) -> int:
    con = await asyncpg.connect(dsn)
    try:
        return await con.fetchval(sql)
    finally:
        await con.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000, help="messages preloaded per shard")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent senders / inserters")
    parser.add_argument("--pause-concurrency", type=int, default=8,
                        help="senders during the first measured cutover (the second uses --concurrency)")
    parser.add_argument("--seconds", type=float, default=8.0, help="duration of each throughput run")
    parser.add_argument("--skip-resharding", action="store_true", help="only the send and list figures")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "latest.json")
    args = parser.parse_args()
    results = asyncio.run(run(args))
    results["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    text = json.dumps(results, indent=2)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()

