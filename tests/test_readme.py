"""The README's API walkthrough runs as written (against a cluster, on its port)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
from pathlib import Path

from tests import packages
from tests.support import ADMIN_TOKEN, Cluster

README = Path(__file__).resolve().parents[1] / "README.md"


def _example(name: str) -> str:
    text = README.read_text()
    match = re.search(rf"<!-- example: {name}\b.*?-->\n```sh\n(.*?)```", text, re.DOTALL)
    assert match, f"README has no example {name!r}"
    return match.group(1)


async def test_the_api_walkthrough_runs_as_written(cluster: Cluster) -> None:
    """Pasted into bash (errors fatal), every command works and prints what its comment shows."""
    packages.ensure("curl", "curl")
    script = _example("api").replace("localhost:8080", cluster.proxy_urls[0].removeprefix("http://"))
    # In a thread: the proxy answering it runs on this test's event loop.
    result = await asyncio.to_thread(
        subprocess.run, ["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    profile, sent, listed, read = (json.loads(line) for line in result.stdout.splitlines())
    assert profile["first_name"] == "Boris" and "birthdate" not in profile
    assert set(sent) == {"id", "created_at"}
    assert [(m["id"], m["text"]) for m in listed] == [(sent["id"], "Привет!")]
    assert read == {"up_to": sent["id"], "unread": 0}


async def test_the_admin_examples_run_as_written(cluster: Cluster) -> None:
    """With the two variables `dialogs admin-token --env` sets, the Admin API examples answer JSON."""
    packages.ensure("curl", "curl")
    env = {"PATH": os.environ["PATH"], "DIALOGS_ADMIN_URL": cluster.proxy_urls[0], "DIALOGS_ADMIN_TOKEN": ADMIN_TOKEN}
    result = await asyncio.to_thread(
        subprocess.run,
        ["bash", "-euo", "pipefail", "-c", _example("admin")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    shard_map, shards, migrations = (json.loads(line) for line in result.stdout.splitlines())
    assert shard_map["map_version"] == 1
    assert {s["shard_id"] for s in shards} == {"shard-1", "shard-2"}
    assert migrations == []


async def test_the_banners_walkthrough_runs_as_printed(cluster: Cluster) -> None:
    """What `dialogs up` prints under "Try it": two users, a message each way, both lists."""
    from dialogsctl.supervisor import walkthrough

    packages.ensure("curl", "curl")
    result = await asyncio.to_thread(
        subprocess.run,
        ["bash", "-euo", "pipefail", "-c", walkthrough(cluster.proxy_urls[0])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    to_boris, to_anna, anna_sees, boris_sees = (json.loads(line) for line in result.stdout.splitlines())
    assert set(to_boris) == set(to_anna) == {"id", "created_at"}
    assert [m["text"] for m in anna_sees] == [m["text"] for m in boris_sees] == ["Hi Anna", "Hi Boris"]
