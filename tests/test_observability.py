"""Dashboards and alert rules only name metrics a running cluster exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support import Cluster

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
METRIC = re.compile(r"\b(dialogs_[a-z0-9_]+)\b")
SUFFIXES = ("_total", "_bucket", "_sum", "_count", "_created")


def _expressions() -> list[str]:
    exprs = []
    for path in sorted((CONFIGS / "grafana" / "dashboards").glob("*.json")):
        board = json.loads(path.read_text())
        exprs += [target["expr"] for panel in board["panels"] for target in panel["targets"]]
    rules = yaml.safe_load((CONFIGS / "prometheus" / "alerts.yml").read_text())
    exprs += [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    return exprs


def _family(name: str) -> str:
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def test_dashboards_are_well_formed() -> None:
    """Three dashboards with unique uids; every panel has a Prometheus query; provisioning points at them."""
    boards = [json.loads(p.read_text()) for p in sorted((CONFIGS / "grafana" / "dashboards").glob("*.json"))]
    assert sorted(b["uid"] for b in boards) == ["dialogs-overview", "dialogs-resharding", "dialogs-shards"]
    for board in boards:
        assert board["panels"]
        for panel in board["panels"]:
            assert panel["targets"] and all(t["expr"] and t["datasource"]["uid"] == "prometheus" for t in panel["targets"])
    provider = yaml.safe_load((CONFIGS / "grafana" / "provisioning" / "dashboards" / "dialogs.yaml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


async def test_every_metric_in_dashboards_and_alerts_is_exported(cluster: Cluster) -> None:
    """After traffic and a shard add, /metrics of the proxy and the workers export every named metric."""
    api = cluster.api
    anna, token = await api.user("Anna")
    for i in range(5):
        peer = await api.register(f"Peer{i}")
        await api.send(token, peer, "hello")
        await api.list(token, peer)
    await cluster.start_worker("shard-3")
    added = await cluster.admin("POST", "/admin/shards", {"shard_id": "shard-3", "dsn": cluster.spare_dsns["shard-3"]})
    assert (await cluster.wait_migration(added.json["migration_id"]))["phase"] == "done"

    exported: set[str] = set()
    urls = cluster.proxy_urls + ["http://127.0.0.1:" + name.split("@")[1] for name in cluster.workers]
    for url in urls:
        async with cluster.session.get(url + "/metrics") as response:
            text = await response.text()
        for family in text_string_to_metric_families(text):
            exported.add(family.name)
            exported.update(sample.name for sample in family.samples)
    named = {name for expr in _expressions() for name in METRIC.findall(expr)}
    assert named, "no metric names found in the configs"
    missing = sorted(name for name in named if name not in exported and _family(name) not in exported)
    assert missing == []
