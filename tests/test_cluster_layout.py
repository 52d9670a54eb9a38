"""cluster.json: the local cluster's ports and secrets, and what the supervisor hands its processes."""

from __future__ import annotations

import json
import stat
import threading
import time
from pathlib import Path

from rich.console import Console

from dialogsctl.cluster import ClusterLayout
from dialogsctl.supervisor import Supervisor


def _earlier_version_file(data_dir: Path) -> None:
    """cluster.json as the version before passwords wrote it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "cluster.json").write_text(
        json.dumps(
            {
                "data_dir": str(data_dir),
                "proxy_port": 8080,
                "meta_port": 41234,
                "jwt_secret": "j" * 48,
                "admin_token": "a" * 32,
                "prometheus_port": None,
                "shards": [{"shard_id": "shard-1", "pg_port": 41235, "worker_port": 41236, "retired": False}],
            }
        )
    )
    (data_dir / "cluster.json").chmod(0o600)


def test_secrets_are_generated_once_for_an_earlier_file(tmp_path: Path) -> None:
    """A cluster.json without passwords or internal secret gets them on load, saved 0600, the same after."""
    _earlier_version_file(tmp_path)
    first = ClusterLayout.load(tmp_path)
    assert first is not None
    saved = json.loads((tmp_path / "cluster.json").read_text())
    assert saved["meta_password"] == first.meta_password and len(first.meta_password) >= 24
    assert saved["internal_secret"] == first.internal_secret and len(first.internal_secret) >= 32
    assert saved["shards"][0]["pg_password"] == first.shards[0].pg_password
    assert stat.S_IMODE((tmp_path / "cluster.json").stat().st_mode) == 0o600
    again = ClusterLayout.load(tmp_path)
    assert again is not None
    assert (again.meta_password, again.internal_secret, again.shards[0].pg_password) == (
        first.meta_password,
        first.internal_secret,
        first.shards[0].pg_password,
    )
    assert f":{first.meta_password}@" in again.metadata_dsn


def test_every_server_has_its_own_password(tmp_path: Path) -> None:
    """Metadata and each shard: distinct generated passwords, in their DSNs."""
    layout = ClusterLayout.create(tmp_path, 8080, 3)
    passwords = [layout.meta_password, *(shard.pg_password for shard in layout.shards)]
    assert len(set(passwords)) == 4
    for shard in layout.shards:
        assert f":{shard.pg_password}@127.0.0.1:{shard.pg_port}/" in layout.shard_dsn(shard)


def test_workers_and_proxy_get_the_internal_secret(tmp_path: Path) -> None:
    """Every worker and the proxy are started with DIALOGS_INTERNAL_SECRET from cluster.json."""
    layout = ClusterLayout.create(tmp_path, 8080, 2)
    children = Supervisor(layout, Console(quiet=True)).planned_children()
    assert sorted(child.name for child in children) == ["proxy", "worker shard-1", "worker shard-2"]
    for child in children:
        assert child.env["DIALOGS_INTERNAL_SECRET"] == layout.internal_secret
        assert child.env["DIALOGS_METADATA_DSN"] == layout.metadata_dsn


def test_edits_of_cluster_json_take_turns(tmp_path: Path) -> None:
    """Two commands that add a shard at once: the second waits for the first's edit, then sees
    it, so they take two names and neither writes over the other."""
    ClusterLayout.create(tmp_path, 8080, 2).save()
    inside, release = threading.Event(), threading.Event()
    names: list[str] = []

    def add(hold: bool) -> None:
        with ClusterLayout.edit(tmp_path) as layout:
            assert layout is not None
            names.append(layout.add_shard().shard_id)
            if hold:
                inside.set()
                release.wait(10)

    first = threading.Thread(target=add, args=(True,))
    first.start()
    assert inside.wait(10)
    second = threading.Thread(target=add, args=(False,))
    second.start()
    time.sleep(0.3)
    assert names == ["shard-3"]  # the second is still waiting for the lock
    release.set()
    first.join(10)
    second.join(10)
    assert names == ["shard-3", "shard-4"]
    layout = ClusterLayout.load(tmp_path)
    assert layout is not None and [s.shard_id for s in layout.shards] == ["shard-1", "shard-2", "shard-3", "shard-4"]


def test_a_take_back_leaves_a_shard_it_did_not_start(tmp_path: Path) -> None:
    """`shard add`'s take-back removes only the entry it wrote: another command's shard under
    the same name (other ports, password) stays, and so does its data folder."""
    from dialogsctl import local_shard

    layout = ClusterLayout.create(tmp_path, 8080, 2)
    ours = layout.add_shard("shard-3")
    layout.save()
    theirs = ClusterLayout.load(tmp_path)
    assert theirs is not None
    theirs.forget_shard("shard-3")
    other = theirs.add_shard("shard-3")  # another command's shard-3, written over ours
    theirs.save()
    (tmp_path / "pg" / "shard-3").mkdir(parents=True)
    said: list[str] = []
    local_shard.take_back(tmp_path, ours, said.append)
    kept = ClusterLayout.load(tmp_path)
    assert kept is not None and kept.shard("shard-3") == other
    assert (tmp_path / "pg" / "shard-3").is_dir()
    assert said == ["shard-3 in cluster.json is not the one this command started; leaving it alone"]
