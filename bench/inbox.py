"""The inbox's figures (issue 18, docs/inbox.md), each against a baseline of the same run.

1. Sends with inbox upkeep against the same cluster without it: a cluster whose workers
   stop the shard schema before the inbox (``DIALOGS_SCHEMA_UNTIL=6``: no outbox, no
   applier), started the same way and running beside it; after a first load of each that
   is not counted, wrk loads one, then the other, in four rounds (ABBA order).
2. Under the same wrk load, with the inbox, in a run of its own (its polls are load the
   ratio's runs must not carry on one side only): how long after a send's acknowledgement
   the recipient's inbox shows it (a probe sends to a recipient of its own every 50 ms and
   polls its first inbox page every 2 ms; the badge is read once it shows).
3. The first inbox page and the badge at 1 connection against a dialog's list, with 2 and
   4 shards (the inbox is one shard's read, so the figure should not move); in turns.
4. A user with 100,000 conversations (made through store_messages on the shards and
   projected by the appliers) against a user with 10: first page and badge.

`python -m bench.inbox` runs it alone; `make bench` runs it as section 8.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import time
import uuid
from typing import Any

import aiohttp
import asyncpg
import jwt

from bench import load
from bench.harness import JWT_SECRET, BenchCluster, Client, cpu_seconds, quantile, send_requests
from dialogs.keys import dialog_key
from dialogs.metastore import maps
from dialogsctl.embedded import scratch_folder


def _token(user: uuid.UUID | str) -> str:
    return jwt.encode({"sub": str(user), "exp": int(time.time()) + 3600}, JWT_SECRET, algorithm="HS256")


def _get(path: str, token: str) -> dict[str, object]:
    return {"method": "GET", "path": path, "headers": {"Authorization": f"Bearer {token}"}}


async def _start(shards: int, worker_env: dict[str, str] | None = None) -> BenchCluster:
    cluster = BenchCluster(scratch_folder("dialogs-bench-inbox-"), shards=shards, spares=0, worker_env=worker_env or {})
    try:
        await cluster.start(proxies=1)
        cluster.wait_workers()
    except BaseException:
        _stop(cluster)
        raise
    return cluster


def _stop(cluster: BenchCluster) -> None:
    cluster.stop()
    shutil.rmtree(cluster.base, ignore_errors=True)


async def _drained(cluster: BenchCluster, shard_ids: list[str], timeout: float = 600.0) -> float:
    """Seconds until every shard's outbox is empty (looked at every 50 ms)."""
    started = time.monotonic()
    cons = [await asyncpg.connect(cluster.dsn(shard_id)) for shard_id in shard_ids]
    try:
        while time.monotonic() - started < timeout:
            pending = 0
            for con in cons:
                pending += await con.fetchval("SELECT count(*) FROM inbox_outbox")
            if not pending:
                return time.monotonic() - started
            await asyncio.sleep(0.05)
    finally:
        for con in cons:
            await con.close()
    raise RuntimeError(f"the outboxes did not drain in {timeout:.0f} s")


async def _probe(client: Client, stop: asyncio.Event) -> list[float]:
    """Seconds from each probe send's answer until the recipient's first inbox page shows it
    (and then its badge counts it)."""
    sender, sender_token = await client.user("probe-sender")
    recipient, recipient_token = await client.user("probe-recipient")
    waits: list[float] = []
    sent = 0
    while not stop.is_set():
        status, answer = await client.call(
            "POST", f"/dialog/{recipient}/send", token=sender_token, body={"text": f"probe {sent}"}
        )
        answered = time.monotonic()
        if status != 200:
            await asyncio.sleep(0.05)
            continue
        sent += 1
        while time.monotonic() - answered < 30:
            _, page = await client.call("GET", "/dialogs", token=recipient_token, params={"limit": "1"})
            if page and page[0]["last_message"]["id"] == answer["id"]:
                waits.append(time.monotonic() - answered)
                _, badge = await client.call("GET", "/dialogs/unread", token=recipient_token)
                if badge["total"] < sent:
                    raise RuntimeError(f"the badge lags its inbox: {badge} after {sent} sends")
                break
            await asyncio.sleep(0.002)
        await asyncio.sleep(0.05)
    return waits


async def _loaded(cluster: BenchCluster, session: aiohttp.ClientSession) -> tuple[Client, list[dict[str, object]]]:
    """A client of ``cluster`` and the sends of the upkeep's load: 64 users, random pairs."""
    client = Client(session, cluster.proxy_urls)
    users = [await client.user(f"u{i}") for i in range(64)]
    return client, send_requests(users)


def _cpu_seconds(cluster: BenchCluster) -> float:
    """CPU seconds the cluster's proxies, workers and PostgreSQL servers have used."""
    services = [c.process.pid for c in [*cluster.proxies, *cluster.workers.values()] if c.process is not None]
    servers = [s.process.pid for s in cluster.servers.values() if s.process is not None]
    return cpu_seconds(services + servers)


async def upkeep(connections: int, seconds: float, rounds: int = 4) -> dict[str, Any]:
    """Sends on a cluster with the inbox against one without, both running at once and
    loaded in turns (without, with; then with, without; ...): this machine's speed drifts
    by tens of percent within a minute, and turns this short give both sides the same
    drift. Then the ack-to-inbox probe beside the same load on the inbox's cluster (its
    polls are load of their own: not in the ratio's runs)."""
    clusters = {
        "without": await _start(2, {"DIALOGS_SCHEMA_UNTIL": "6"}),
        "with": await _start(2),
    }
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            loads = {name: await _loaded(cluster, session) for name, cluster in clusters.items()}
            # A first load of each, not counted: the inbox's cluster makes its rows and
            # totals (one per conversation and user of the load) and analyzes its new tables
            # in its first seconds; the rounds then measure both in their steady state.
            for name, cluster in clusters.items():
                await asyncio.to_thread(load.wrk, cluster.proxy_urls[0], loads[name][1], connections, seconds / 2)
            await _drained(clusters["with"], ["shard-1", "shard-2"])
            runs: dict[str, list[load.Load]] = {"with": [], "without": []}
            behind: list[float] = []  # after each run with the inbox: seconds until its outboxes were empty
            # Each cluster's CPU over all the rounds, its idle time in the other's turns
            # included: whatever work the inbox defers (autovacuum, checkpoints) is counted.
            cpu_before = {name: _cpu_seconds(cluster) for name, cluster in clusters.items()}
            for round_ in range(rounds):
                for name in ("without", "with") if round_ % 2 == 0 else ("with", "without"):
                    url = clusters[name].proxy_urls[0]
                    runs[name].append(await asyncio.to_thread(load.wrk, url, loads[name][1], connections, seconds))
                    if name == "with":
                        # Drained before the other side's turn: no upkeep spills into its run.
                        behind.append(await _drained(clusters[name], ["shard-1", "shard-2"]))
            cpu = {name: _cpu_seconds(cluster) - cpu_before[name] for name, cluster in clusters.items()}
            client, sends = loads["with"]
            stop = asyncio.Event()
            probing = asyncio.ensure_future(_probe(client, stop))
            try:
                probed = await asyncio.to_thread(load.wrk, clusters["with"].proxy_urls[0], sends, connections, seconds)
            finally:
                stop.set()
            waits = await probing
    finally:
        for cluster in clusters.values():
            _stop(cluster)
    total = {k: sum(r.per_second for r in v) for k, v in runs.items()}
    return {
        "connections": connections,
        "with_inbox": [r.to_json() for r in runs["with"]],
        "without_inbox": [r.to_json() for r in runs["without"]],
        "ratio": round(total["with"] / total["without"], 3),
        "target": ">= 0.8x",
        "outbox_drained_after_seconds": [round(b, 2) for b in behind],
        # Service CPU (not wrk's) per send over all the rounds, each cluster's own.
        "cpu_us_per_send": {
            name: round(cpu[name] / sum(r.requests for r in runs[name]) * 1e6) for name in ("with", "without")
        },
        "ack_to_inbox": {
            "probes": len(waits),
            "p50_ms": round(quantile(waits, 0.5) * 1000, 1),
            "p99_ms": round(quantile(waits, 0.99) * 1000, 1),
            "max_ms": round(max(waits) * 1000, 1) if waits else None,
            "under": f"{connections} wrk senders ({probed.per_second:,.0f} sends/s)",
        },
    }


def _mean(loads: list[load.Load]) -> load.Load:
    """Runs of one kind as one: mean rate and quantiles, summed requests and failures."""
    return load.Load(
        sum(r.per_second for r in loads) / len(loads),
        sum(r.p50_ms for r in loads) / len(loads),
        sum(r.p99_ms for r in loads) / len(loads),
        sum(r.requests for r in loads),
        sum(r.failed for r in loads),
    )


async def pages(shards: int, seconds: float, users: int = 100, conversations: int = 10) -> dict[str, Any]:
    """Inbox first page and badge vs a dialog's list, at 1 connection (latency) and at 32
    (throughput); each user has ``conversations`` conversations of 3 messages. Each kind
    is loaded three times for ``seconds``/2 at each concurrency, in turns; its figure is
    the mean of its runs."""
    cluster = await _start(shards)
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as session:
            client = Client(session, cluster.proxy_urls)
            people = [await client.user(f"p{i}") for i in range(users)]
            rng = random.Random(3)
            pairs = set()
            for index in range(users):
                while sum(1 for a, _ in pairs if a == index) < conversations:
                    other = rng.randrange(users)
                    if other != index:
                        pairs.add((index, other))
            semaphore = asyncio.Semaphore(32)

            async def send(a: int, b: int) -> None:
                async with semaphore:
                    for turn in range(3):
                        status, _ = await client.call(
                            "POST", f"/dialog/{people[b][0]}/send", token=people[a][1], body={"text": f"m{turn}"}
                        )
                        assert status == 200

            await asyncio.gather(*(send(a, b) for a, b in sorted(pairs)))
        await _drained(cluster, [f"shard-{n}" for n in range(1, shards + 1)])
        url = cluster.proxy_urls[0]
        inbox = [_get("/dialogs?limit=100", token) for _, token in people]
        badge = [_get("/dialogs/unread", token) for _, token in people]
        lists = [_get(f"/dialog/{people[b][0]}/list?limit=100", people[a][1]) for a, b in sorted(pairs)]
        # Three rounds, the order turned each round, so the machine's drift meets each alike.
        requests = {"list": lists, "inbox": inbox, "unread": badge}
        busy = 32
        runs_at: dict[int, dict[str, load.Load]] = {}
        rounds_at: dict[int, dict[str, list[load.Load]]] = {}
        for connections in (1, busy):
            rounds: dict[str, list[load.Load]] = {name: [] for name in requests}
            order = list(requests)
            for _ in range(3):
                for name in order:
                    threads = min(2, connections)
                    run = await asyncio.to_thread(load.wrk, url, requests[name], connections, seconds / 2, threads)
                    rounds[name].append(run)
                order = order[1:] + order[:1]
            rounds_at[connections] = rounds
            runs_at[connections] = {name: _mean(loads) for name, loads in rounds.items()}
        runs, loaded = runs_at[1], runs_at[busy]
        return {
            "shards": shards,
            **{name: run.to_json() for name, run in runs.items()},
            "rounds": {name: [run.to_json() for run in loads] for name, loads in rounds_at[1].items()},
            "inbox_added_p50_ms": round(runs["inbox"].p50_ms - runs["list"].p50_ms, 3),
            "unread_added_p50_ms": round(runs["unread"].p50_ms - runs["list"].p50_ms, 3),
            f"at_{busy}": {
                **{name: run.to_json() for name, run in loaded.items()},
                "rounds": {name: [run.to_json() for run in loads] for name, loads in rounds_at[busy].items()},
                "inbox_throughput_ratio": round(loaded["inbox"].per_second / loaded["list"].per_second, 3),
                "unread_throughput_ratio": round(loaded["unread"].per_second / loaded["list"].per_second, 3),
            },
        }
    finally:
        _stop(cluster)


async def hot_user(seconds: float, conversations: int = 100_000) -> dict[str, Any]:
    """A user with ``conversations`` conversations (one message each from a new peer, stored
    on the dialogs' shards by store_messages and projected by the appliers) against one with 10."""
    cluster = await _start(2)
    try:
        con = await asyncpg.connect(cluster.dsn("meta"))
        try:
            shard_map = await maps.active_map(con)
        finally:
            await con.close()
        assert shard_map is not None
        hot, small = uuid.uuid4(), uuid.uuid4()
        started = time.monotonic()
        for owner, count in ((hot, conversations), (small, 10)):
            by_shard: dict[str, list[tuple[int, uuid.UUID, uuid.UUID, bool]]] = {}
            for _ in range(count):
                peer = uuid.uuid4()
                lo, hi = sorted((owner, peer))
                key = dialog_key(lo, hi)
                by_shard.setdefault(shard_map.owner(key), []).append((key, lo, hi, peer == lo))
            for shard_id, rows in by_shard.items():
                con = await asyncpg.connect(cluster.dsn(shard_id))
                try:
                    for index in range(0, len(rows), 5000):
                        chunk = rows[index : index + 5000]
                        await con.fetch(
                            "SELECT * FROM store_messages($1, $2, $3, $4, $5, $6)",
                            [r[0] for r in chunk], [r[1] for r in chunk], [r[2] for r in chunk],
                            [r[3] for r in chunk], ["hello"] * len(chunk), [None] * len(chunk),
                        )  # fmt: skip
                finally:
                    await con.close()
        stored = time.monotonic() - started
        projected = await _drained(cluster, ["shard-1", "shard-2"])
        url = cluster.proxy_urls[0]

        requests = {
            "small_first_page": ("/dialogs?limit=100", small),
            "hot_first_page": ("/dialogs?limit=100", hot),
            "hot_first_10": ("/dialogs?limit=10", hot),
            "small_unread": ("/dialogs/unread", small),
            "hot_unread": ("/dialogs/unread", hot),
        }
        rounds: dict[str, list[load.Load]] = {name: [] for name in requests}
        order = list(requests)
        for _ in range(3):  # in turns, as the pages above
            for name in order:
                path, user = requests[name]
                rounds[name].append(
                    await asyncio.to_thread(load.wrk, url, [_get(path, _token(user))], 1, seconds / 2, 1)
                )
            order = order[1:] + order[:1]
        runs = {name: _mean(loads) for name, loads in rounds.items()}
        return {
            "conversations": conversations,
            "stored_seconds": round(stored, 1),
            "projected_seconds": round(projected, 1),
            "projected_per_second": round(conversations / max(projected, 0.001)),
            **{name: run.to_json() for name, run in runs.items()},
            # Pages of 100 and of 10 items (all the small user has), then 10 against 10.
            "first_page_p50_ratio": round(runs["hot_first_page"].p50_ms / runs["small_first_page"].p50_ms, 3),
            "first_10_p50_ratio": round(runs["hot_first_10"].p50_ms / runs["small_first_page"].p50_ms, 3),
            "unread_p50_ratio": round(runs["hot_unread"].p50_ms / runs["small_unread"].p50_ms, 3),
        }
    finally:
        _stop(cluster)


async def figures(connections: int, seconds: float) -> dict[str, Any]:
    return {
        "upkeep": await upkeep(connections, seconds),
        "pages": [await pages(shards, seconds) for shards in (2, 4)],
        "hot_user": await hot_user(seconds),
    }


def summary_rows(figures: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """The inbox's lines of `make bench`'s table."""
    if "error" in figures:
        return [("inbox", "error", figures["error"], "")]
    if not figures:
        return []
    upkeep, hot = figures["upkeep"], figures["hot_user"]
    mean = {k: sum(r["per_second"] for r in upkeep[k]) / len(upkeep[k]) for k in ("with_inbox", "without_inbox")}
    rows = [
        (
            "sends/s with inbox upkeep vs without",
            f"{mean['with_inbox']:,.0f} / {mean['without_inbox']:,.0f}",
            f"{upkeep['ratio']:.2f}x",
            ">= 0.8x",
        ),
        (
            f"send answered -> recipient's inbox shows it ({upkeep['connections']} senders)",
            f"p50 {upkeep['ack_to_inbox']['p50_ms']:.0f} ms",
            f"p99 {upkeep['ack_to_inbox']['p99_ms']:.0f} ms",
            "(reported)",
        ),
    ]
    for run in figures["pages"]:
        rows.append(
            (
                f"inbox first page p50 vs a list's, 1 connection, {run['shards']} shards",
                f"{run['inbox']['p50_ms']:.2f} - {run['list']['p50_ms']:.2f} ms",
                f"{run['inbox_added_p50_ms']:+.2f} ms",
                "<= +0.5 ms, flat",
            )
        )
        loaded = run.get("at_32")
        if loaded:
            rows.append(
                (
                    f"inbox pages/s vs lists/s, 32 connections, {run['shards']} shards",
                    f"{loaded['inbox']['per_second']:,.0f} / {loaded['list']['per_second']:,.0f}",
                    f"{loaded['inbox_throughput_ratio']:.2f}x",
                    "(reported)",
                )
            )
            rows.append(
                (
                    f"badges/s vs lists/s, 32 connections, {run['shards']} shards",
                    f"{loaded['unread']['per_second']:,.0f} / {loaded['list']['per_second']:,.0f}",
                    f"{loaded['unread_throughput_ratio']:.2f}x",
                    "(reported)",
                )
            )
    rows.append(
        (
            f"first 10 conversations p50, a user with {hot['conversations']:,} vs one with 10",
            f"{hot['hot_first_10']['p50_ms']:.2f} / {hot['small_first_page']['p50_ms']:.2f} ms",
            f"{hot['first_10_p50_ratio']:.2f}x",
            "about 1x",
        )
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(figures(args.concurrency, args.seconds)), indent=2))


if __name__ == "__main__":
    main()
