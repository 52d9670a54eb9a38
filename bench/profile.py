"""`python -m bench.profile`: py-spy profiles of a proxy and a worker under wrk load.

Starts the bench cluster, loads it for ``--seconds`` with wrk at ``--connections``
(``--load sends``, or ``--load lists`` of preloaded dialogs), records the proxy and
shard-1's worker with py-spy (installed with `pip install py-spy`), and prints the CPU
split among proxy, workers, PostgreSQL and wrk per request, then the functions that hold
the most samples (own time and total time) in each process.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import aiohttp

from bench import load
from bench.harness import BenchCluster, Client, CpuSplit, list_requests, preload, send_requests
from dialogsctl.embedded import scratch_folder


def _top(raw: Path, count: int) -> list[str]:
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        weight = int(n)
        samples += weight
        own[frames[-1]] += weight
        for frame in set(frames):
            total[frame] += weight
    lines = [f"  own   {100 * n / samples:5.1f}%  {frame}" for frame, n in own.most_common(count)]
    lines += [f"  total {100 * n / samples:5.1f}%  {frame}" for frame, n in total.most_common(count * 2)]
    return lines


async def run(args: argparse.Namespace) -> None:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    tmp = scratch_folder("dialogs-profile-")
    cluster = BenchCluster(tmp)
    try:
        await cluster.start(proxies=1)
        if args.load == "lists":
            requests = list_requests(await preload(cluster, args.rows))
        else:
            async with aiohttp.ClientSession() as session:
                client = Client(session, cluster.proxy_urls)
                requests = send_requests([await client.user(f"u{i}") for i in range(64)])
        targets = {"proxy": cluster.proxies[0], "worker": cluster.workers["shard-1"]}
        outputs = {name: tmp / f"{name}.txt" for name in targets}
        spies = [
            subprocess.Popen(
                [
                    py_spy,
                    "record",
                    "-r",
                    "200",
                    "-d",
                    str(int(args.seconds)),
                    "-f",
                    "raw",
                    "-o",
                    str(outputs[name]),
                    "-p",
                    str(child.process.pid),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for name, child in targets.items()
            if child.process is not None
        ]
        result: list[load.Load] = []
        thread = threading.Thread(
            target=lambda: result.append(load.wrk(cluster.proxy_urls[0], requests, args.connections, args.seconds + 1))
        )
        with CpuSplit(cluster) as split:
            thread.start()
            for spy in spies:
                spy.wait()
            thread.join()
        run = result[0]
        print(f"{args.load}: {run.per_second:.0f}/s, p50 {run.p50_ms:.2f} ms at {args.connections} connections")
        print(f"CPU per request (µs, py-spy's own share included): {split.to_json(run.requests)}")
        for name, path in outputs.items():
            if args.save is not None:
                args.save.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, args.save / path.name)
            print(f"\n{name}:")
            print("\n".join(_top(path, args.top)))
    finally:
        cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", choices=("sends", "lists"), default="sends")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rows", type=int, default=100_000, help="messages preloaded per shard (--load lists)")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--save", type=Path, help="a folder to keep the raw py-spy profiles in (proxy.txt, worker.txt)")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
