"""`python -m bench` (or `make bench`): the brief's figures, each against a baseline of the same run.

1. send throughput through the proxies vs raw single-row INSERTs into one shard, same concurrency
2. list latency the proxy and worker add over the same query run directly (p50)
3. resharding copy rate vs PostgreSQL's own COPY between the same two servers
4. the write pause at cutover, under load (client-side latency of sends in flight during it),
   once with headroom (8 senders) and once with the machine saturated (32 senders)
5. write scaling: sends with 1, 2 and 4 shards, each shard's PostgreSQL CPU-capped (bench/scaling.py)
6. growth with data: adding a shard over 100k and over 1M stored messages (bench/growth.py)

Results go to stdout and bench/results/latest.json. Servers run with fsync on.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import psutil

from bench import growth, inbox, load, replicas, scaling
from bench.harness import (
    JWT_SECRET,
    BenchCluster,
    Client,
    CpuSplit,
    cutover_pause,
    list_requests,
    preload,
    psql_copy,
    send_requests,
)
from dialogsctl.embedded import scratch_folder
from dialogsctl.net import free_port
from dialogsctl.supervisor import proxy_processes

COLUMNS = "dialog_key, user_lo, user_hi, id, from_lo, text, created_at, idempotency_key"


RAW_INSERT = """
\\set k random(1, 9223372036854775806)
INSERT INTO bench_raw (dialog_key, user_lo, user_hi, id, from_lo, text, created_at)
SELECT :k, least(a, b), greatest(a, b), :k, true, 'hello, this is a message', now()
FROM (SELECT gen_random_uuid() AS a, gen_random_uuid() AS b) AS pair;
"""

# A dialog's newest page, read straight off the primary key, for a random preloaded dialog of
# the shard: the query at the heart of the worker's list statement (dialog_api/storage.py),
# without its ownership check, byte bound or JSON rendering.
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


def monolith_sends(dsn: str, requests: list[dict[str, object]], connections: int, seconds: float) -> load.Load:
    """The naive single-node monolith (bench/monolith.py) under the same sends."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.monolith", "--dsn", dsn, "--port", str(port), "--secret", JWT_SECRET],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
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


async def run(args: argparse.Namespace) -> dict[str, Any]:
    tmp = scratch_folder("dialogs-bench-")
    try:
        cluster = BenchCluster(tmp)
        try:
            print("starting servers, workers and proxies…", flush=True)
            await cluster.start(processes=args.proxy_processes)
            dialogs = await preload(cluster, args.rows)
            connector = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(connector=connector) as session:
                client = Client(session, cluster.proxy_urls)
                users = [await client.user(f"u{i}") for i in range(64)]

                proxy_url = cluster.proxy_urls[0]
                sends = send_requests(users)
                print("1/8 send throughput (wrk, pgbench, the naive monolith)…", flush=True)
                raw = await raw_inserts(cluster.dsn("shard-1"), args.concurrency, args.seconds)
                monolith = monolith_sends(cluster.dsn("shard-1"), sends, args.concurrency, args.seconds)
                with load.PeakRss(_service_pids(cluster)) as send_rss, CpuSplit(cluster) as send_cpu:
                    proxied = load.wrk(proxy_url, sends, args.concurrency, args.seconds)

                print("2/8 lists (wrk through a proxy, pgbench directly)…", flush=True)
                lists = list_requests(dialogs)
                shard_dialogs = await _count(cluster.dsn("shard-1"), "SELECT count(*) FROM bench_dialogs")
                list_runs = {
                    "direct_1": list_direct(cluster.dsn("shard-1"), shard_dialogs, 1, args.seconds),
                    "direct_32": list_direct(cluster.dsn("shard-1"), shard_dialogs, args.concurrency, args.seconds),
                }
                list_cpu: dict[str, Any] = {}
                for name, connections in (("proxy_1", 1), ("proxy_32", args.concurrency)):
                    with CpuSplit(cluster) as split:
                        run = load.wrk(proxy_url, lists, connections, args.seconds, threads=min(2, connections))
                    list_runs[name] = run
                    list_cpu[name] = split.to_json(run.requests)

                copy: dict[str, Any] | None = None
                pauses: list[dict[str, Any]] = []
                runner_log: list[str] = []
                if not args.skip_resharding:
                    print("3/8 resharding copy rate…", flush=True)
                    copy = await copy_rates(cluster, client)

                    print("4/8 cutover pause under load…", flush=True)
                    # Once with headroom, once with the machine saturated (see steady_p99_ms).
                    pauses = [
                        await cutover_pause(client, users, args.pause_concurrency, "DELETE", "/admin/shards/shard-3"),
                        await cutover_pause(
                            client,
                            users,
                            args.concurrency,
                            "POST",
                            "/admin/shards",
                            {"shard_id": "shard-3", "dsn": cluster.dsn("shard-3")},
                        ),
                    ]
                    runner_log = cluster.cutover_log()
        finally:
            cluster.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_scaling: dict[str, Any] | None = None
    data_growth: dict[str, Any] | None = None
    # These two start clusters of their own; a failure there must not cost the figures above.
    if not args.skip_scaling:
        print("5/8 write scaling with CPU-capped shards…", flush=True)
        write_scaling = await _section(scaling.scaling(args.scaling_cores, 32, args.seconds))
    if not args.skip_growth:
        print("6/8 adding a shard as data grows…", flush=True)
        data_growth = await _section(growth.growth((100_000, 1_000_000), args.pause_concurrency))
    replication: dict[str, Any] | None = None
    if not args.skip_replicas:
        print("7/8 sends with a synchronous standby per shard (Patroni) vs without…", flush=True)
        replication = await _section(replicas.synchronous_cost(args.concurrency, args.seconds))
    inbox_figures: dict[str, Any] | None = None
    if not args.skip_inbox:
        print(
            "8/8 the inbox: sends with its upkeep, ack to inbox, pages, a user with 100,000 conversations…", flush=True
        )
        inbox_figures = await _section(inbox.figures(args.concurrency, args.seconds))
    return {
        "inbox": inbox_figures,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "replication": replication,
        "send_throughput": {
            "connections": args.concurrency,
            "proxy_processes": args.proxy_processes,
            "proxy": proxied.to_json(),
            "naive_monolith": monolith.to_json(),
            "raw_insert_pgbench": raw.to_json(),
            "peak_rss_mib": {name: round(mib, 1) for name, mib in send_rss.peak_mib.items()},
            "cpu": send_cpu.to_json(proxied.requests),
            "ratio_to_monolith": round(proxied.per_second / monolith.per_second, 3),
            "ratio_to_raw_insert": round(proxied.per_second / raw.per_second, 3),
            "target": ">= 1.5x the monolith and >= 0.4x raw INSERTs (aim: 1.0x raw)",
        },
        "lists": {
            **{name: run.to_json() for name, run in list_runs.items()},
            "added_p50_ms_at_1": round(list_runs["proxy_1"].p50_ms - list_runs["direct_1"].p50_ms, 3),
            "throughput_ratio_at_32": round(list_runs["proxy_32"].per_second / list_runs["direct_32"].per_second, 3),
            "cpu": list_cpu,
            "target": "added p50 <= 0.7 ms at 1 connection; >= 0.25x direct throughput at 32",
        },
        "copy_rate": None
        if copy is None
        else {
            **{k: round(v, 3) if isinstance(v, float) else v for k, v in copy.items()},
            "ratio": round(copy["migration_rows_per_second"] / copy["baseline_rows_per_second"], 3),
            "target": ">= 0.5",
        },
        "cutover_pause": {
            "runs": [{k: round(v, 1) if isinstance(v, float) else v for k, v in pause.items()} for pause in pauses],
            "runner_log": runner_log,
            "target": "p99 < 250 ms, max < 1000 ms, no failed sends",
        },
        "write_scaling": write_scaling,
        "data_growth": data_growth,
    }


async def _section(measurement: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
    try:
        return await measurement
    except Exception as exc:  # reported in the results, next to the figures that did come
        print(f"   failed: {exc!r}", flush=True)
        return {"error": repr(exc)}


def _service_pids(cluster: BenchCluster) -> dict[str, int]:
    """The first proxy (each of its processes, when it runs several) and every worker."""
    pids: dict[str, int] = {}
    proxy = cluster.proxies[0].process
    assert proxy is not None
    children = psutil.Process(proxy.pid).children()
    if children:
        pids.update({f"proxy process {index}": child.pid for index, child in enumerate(children)})
    else:
        pids["proxy"] = proxy.pid
    pids.update({f"worker {s}": w.process.pid for s, w in cluster.workers.items() if w.process is not None})
    return pids


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
    parser.add_argument(
        "--pause-concurrency",
        type=int,
        default=8,
        help="senders during the first measured cutover (the second uses --concurrency)",
    )
    parser.add_argument("--seconds", type=float, default=8.0, help="duration of each throughput run")
    parser.add_argument("--skip-resharding", action="store_true", help="no copy-rate and cutover figures")
    parser.add_argument("--skip-scaling", action="store_true", help="no write-scaling figures")
    parser.add_argument("--skip-growth", action="store_true", help="no growth-with-data figures")
    parser.add_argument("--skip-replicas", action="store_true", help="no synchronous-standby figure")
    parser.add_argument("--skip-inbox", action="store_true", help="no inbox figures")
    parser.add_argument(
        "--proxy-processes",
        type=int,
        default=proxy_processes(),
        help="DIALOGS_PROCESSES of the measured proxy (default: what `dialogs up` picks)",
    )
    parser.add_argument(
        "--scaling-cores",
        type=float,
        default=0.03,
        help="CPU cap of each shard's PostgreSQL in the write-scaling runs, in cores",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "latest.json")
    args = parser.parse_args()
    results = asyncio.run(run(args))
    results["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    text = json.dumps(results, indent=2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(summary(results))
    print(f"\nall figures: {args.out}")


def summary(results: dict[str, Any]) -> str:
    """The figures against their baselines and targets, as a table."""
    rows: list[tuple[str, str, str, str]] = []
    sends = results["send_throughput"]
    rows.append(
        (
            "sends/s through a proxy vs the naive monolith",
            f"{sends['proxy']['per_second']:,.0f} / {sends['naive_monolith']['per_second']:,.0f}",
            f"{sends['ratio_to_monolith']:.2f}x",
            ">= 1.5x",
        )
    )
    rows.append(
        (
            "sends/s through a proxy vs raw INSERTs (pgbench)",
            f"{sends['proxy']['per_second']:,.0f} / {sends['raw_insert_pgbench']['per_second']:,.0f}",
            f"{sends['ratio_to_raw_insert']:.3f}x",
            ">= 0.4x",
        )
    )
    lists = results["lists"]
    rows.append(
        (
            "list p50 added at 1 connection",
            f"{lists['proxy_1']['p50_ms']:.2f} - {lists['direct_1']['p50_ms']:.2f} ms",
            f"{lists['added_p50_ms_at_1']:.2f} ms",
            "<= 0.7 ms",
        )
    )
    rows.append(
        (
            "lists/s at 32 vs the query directly",
            f"{lists['proxy_32']['per_second']:,.0f} / {lists['direct_32']['per_second']:,.0f}",
            f"{lists['throughput_ratio_at_32']:.3f}x",
            ">= 0.25x",
        )
    )
    if results["copy_rate"]:
        copy = results["copy_rate"]
        rows.append(
            (
                "resharding copy vs COPY (rows/s)",
                f"{copy['migration_rows_per_second']:,.0f} / {copy['baseline_rows_per_second']:,.0f}",
                f"{copy['ratio']:.2f}x",
                ">= 0.5x",
            )
        )
    for run in results["cutover_pause"]["runs"]:
        rows.append(
            (
                f"cutover pause, {run['migration']}, {run['senders_in_flight']} senders",
                f"max {run['pause_max_ms']:.0f} ms, {run['failed']} failed",
                f"p99 {run['pause_p99_ms']:.0f} ms",
                "p99 < 250 ms",
            )
        )
    scaled = results.get("write_scaling") or {}
    grown = results.get("data_growth") or {}
    for run in scaled.get("runs", []):
        rows.append(
            (
                f"sends/s, {run['shards']} CPU-capped shard(s), {run['connections']} connections",
                f"{run['per_second']:,.0f}",
                f"{scaled['speedup'][str(run['shards']) + '_shards']:.2f}x",
                {1: "1x", 2: ">= 1.8x", 4: ">= 3.2x"}.get(run["shards"], ""),
            )
        )
    for problem in ("skipped", "error"):
        if problem in scaled:
            rows.append(("write scaling", problem, scaled[problem], ""))
        if problem in grown:
            rows.append(("growth with data", problem, grown[problem], ""))
    for run in grown.get("runs", []):
        rows.append(
            (
                f"add a shard over {run['stored_messages']:,} messages",
                f"{run['rows_copied']:,} rows in {run['copy_seconds']:.1f} s",
                f"pause p99 {run['pause_p99_ms']:.0f} ms",
                "pause flat",
            )
        )
    replicated = results.get("replication") or {}
    if "ratio" in replicated:
        rows.append(
            (
                "sends/s with a synchronous standby vs without",
                (
                    f"{replicated['with_synchronous_standby']['per_second']:,.0f}"
                    f" / {replicated['without_standby']['per_second']:,.0f}"
                ),
                f"{replicated['ratio']:.2f}x",
                "the cost of copies",
            )
        )
    elif "error" in replicated:
        rows.append(("synchronous standby", "error", replicated["error"], ""))
    rows += inbox.summary_rows(results.get("inbox") or {})
    for name, mib in sends["peak_rss_mib"].items():
        rows.append((f"peak RSS under send load, {name}", f"{mib:.0f} MiB", "", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    header = ("figure", "measured", "ratio", "target")
    widths = [max(w, len(h)) for w, h in zip(widths, header, strict=True)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, tuple("-" * w for w in widths), *rows]
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
