"""`python -m bench.scaling`: write scaling with CPU-capped shards (1, 2 and 4 of them).

On one machine every shard's PostgreSQL shares the same cores, so adding shards adds no
capacity and the proxy, not the shards, ends up the bottleneck. Here each shard's
PostgreSQL runs in a cgroup (v1 ``cpu`` controller, ``cpu.cfs_quota_us``) capped at a
small share of a core, as if each sat on a small machine of its own; the proxy and
workers are not capped. Send throughput with 1, 2 and 4 such shards, same load (wrk, 32
connections), shows how writes scale with shards. Needs root and the cgroup v1 ``cpu``
controller; elsewhere it reports why it was skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from bench import load
from bench.harness import BenchCluster, Client, send_requests
from dialogsctl.embedded import LocalPostgres, scratch_folder
from dialogsctl.supervisor import proxy_processes

CPU_CONTROLLER = Path("/sys/fs/cgroup/cpu")
MIN_QUOTA_US = 1000  # the kernel's smallest quota


def unavailable() -> str | None:
    """Why CPU caps cannot be set here, or None."""
    if os.geteuid() != 0:
        return "CPU caps need root (cgroup v1 cpu.cfs_quota_us)"
    if not (CPU_CONTROLLER / "cpu.cfs_quota_us").exists():
        return f"no cgroup v1 cpu controller at {CPU_CONTROLLER}"
    return None


class CpuCap:
    """A cgroup of its own for one PostgreSQL server and every process it forks."""

    def __init__(self, name: str, cores: float) -> None:
        self.path = CPU_CONTROLLER / f"dialogs-bench-{os.getpid()}-{name}"
        # The shortest period the cap allows: a capped server runs often and briefly (not
        # 5 ms, then 95 ms stopped), so the cap adds as little latency as it can.
        period = max(10_000, math.ceil(MIN_QUOTA_US / cores))
        self.path.mkdir()
        try:
            (self.path / "cpu.cfs_period_us").write_text(str(period))
            (self.path / "cpu.cfs_quota_us").write_text(str(max(MIN_QUOTA_US, round(cores * period))))
        except OSError:
            self.path.rmdir()
            raise

    def add(self, server: LocalPostgres) -> None:
        assert server.process is not None
        postmaster = psutil.Process(server.process.pid)
        # Backends forked later inherit the postmaster's cgroup; its helpers exist already.
        for process in [postmaster, *postmaster.children(recursive=True)]:
            try:
                (self.path / "cgroup.procs").write_text(str(process.pid))
            except ProcessLookupError:
                pass  # a helper that has exited meanwhile

    def stat(self) -> tuple[int, int]:
        """(periods, periods in which the cap stopped the server) so far."""
        stat = dict(line.split() for line in (self.path / "cpu.stat").read_text().splitlines())
        return int(stat.get("nr_periods", 0)), int(stat.get("nr_throttled", 0))

    def remove(self) -> None:
        for pid in (self.path / "cgroup.procs").read_text().split():
            try:
                (CPU_CONTROLLER / "cgroup.procs").write_text(pid)
            except OSError:
                pass  # exited meanwhile
        self.path.rmdir()


async def sends_with(shards: int, cores: float, connections: int, seconds: float) -> dict[str, Any]:
    caps: dict[str, CpuCap] = {}

    def cap(name: str, server: LocalPostgres) -> None:
        caps[name] = CpuCap(name, cores)
        caps[name].add(server)

    tmp = scratch_folder("dialogs-scaling-")
    cluster = BenchCluster(tmp, shards=shards, spares=0, on_shard_server=cap)
    try:
        await cluster.start(proxies=1, processes=proxy_processes())
        await asyncio.to_thread(cluster.wait_workers)
        async with aiohttp.ClientSession() as session:
            client = Client(session, cluster.proxy_urls)
            users = [await client.user(f"u{i}") for i in range(64)]
        requests = send_requests(users)
        load.wrk(cluster.proxy_urls[0], requests, connections, 2)  # warm-up
        before = {name: c.stat() for name, c in caps.items()}
        result = load.wrk(cluster.proxy_urls[0], requests, connections, seconds)
        after = {name: c.stat() for name, c in caps.items()}
        throttled = {
            name: (after[name][1] - before[name][1]) / max(1, after[name][0] - before[name][0]) for name in caps
        }
        return {
            "shards": shards,
            "connections": connections,
            **result.to_json(),
            # Near 1: the cap stopped the shard in almost every period, so the shards bound throughput.
            "shard_throttled_share": {name: round(share, 3) for name, share in throttled.items()},
        }
    finally:
        try:
            cluster.stop()
        finally:
            for c in caps.values():
                with contextlib.suppress(OSError):
                    c.remove()
            shutil.rmtree(tmp, ignore_errors=True)


async def scaling(cores: float, per_shard: int, seconds: float, counts: tuple[int, ...] = (1, 2, 4)) -> dict[str, Any]:
    """Each run offers every shard the same load: ``per_shard`` connections per shard."""
    reason = unavailable()
    if reason is not None:
        return {"skipped": reason}
    runs = []
    for shards in counts:
        print(
            f"   {shards} shard(s), each capped at {cores:g} of a core, {per_shard * shards} connections…", flush=True
        )
        runs.append(await sends_with(shards, cores, per_shard * shards, seconds))
    one = runs[0]["per_second"]
    return {
        "cores_per_shard": cores,
        "connections_per_shard": per_shard,
        "runs": runs,
        "speedup": {f"{run['shards']}_shards": round(run["per_second"] / one, 2) for run in runs},
        "target": ">= 1.8x at 2 shards and >= 3.2x at 4 over 1",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cores", type=float, default=0.03, help="CPU cap of each shard's PostgreSQL, in cores")
    parser.add_argument("--per-shard", type=int, default=32, help="wrk connections per shard")
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(scaling(args.cores, args.per_shard, args.seconds)), indent=2))


if __name__ == "__main__":
    main()
