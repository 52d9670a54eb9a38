"""Dashboards and alert rules only name metrics a running cluster exports."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from pathlib import Path

import asyncpg
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from dialogs.metastore import members
from dialogsctl.net import free_port
from tests.prometheus import Prometheus, ensure_installed
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
            assert panel["targets"] and all(
                t["expr"] and t["datasource"]["uid"] == "prometheus" for t in panel["targets"]
            )
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


@pytest.fixture(scope="session")
def prometheus_installed() -> None:
    ensure_installed()


def test_promtool_accepts_the_config_and_rules(prometheus_installed: None) -> None:
    """promtool check config / check rules pass on configs/prometheus."""
    for args in (
        ["check", "config", str(CONFIGS / "prometheus" / "prometheus.yml")],
        ["check", "rules", str(CONFIGS / "prometheus" / "alerts.yml")],
    ):
        result = subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr


_COMPARISON = re.compile(r"\s(>=|<=|==|!=|>|<)\s+[0-9.e-]+\s*$")


async def _until_scraped(prometheus: Prometheus, cluster: Cluster, target: tuple[str, str, str]) -> None:
    deadline = asyncio.get_running_loop().time() + 30
    while target not in (seen := await prometheus.targets(cluster.session)):
        assert asyncio.get_running_loop().time() < deadline, f"{target} never scraped: {seen}"
        await asyncio.sleep(0.5)


@pytest.mark.timeout(180)
async def test_real_prometheus_evaluates_every_panel_and_alert(
    cluster: Cluster, prometheus_installed: None, tmp_path: Path
) -> None:
    """A real Prometheus, finding its targets through the proxy's discovery endpoint as
    configs/prometheus does, scrapes a cluster under traffic through a shard add (whose
    worker it finds by itself): every panel query and every alert expression (without its
    threshold) evaluates without error and returns data."""
    prometheus = Prometheus(
        tmp_path / "prometheus", CONFIGS / "prometheus" / "alerts.yml", discovery=cluster.proxy_urls[0]
    )
    prometheus.start()
    try:
        await prometheus.wait_ready(cluster.session)
        api = cluster.api
        anna, token = await api.user("Anna")
        peers = [await api.register(f"Peer{i}") for i in range(8)]
        # A crashed worker's registration: forwarding errors get counted, clients see none.
        con = await asyncpg.connect(cluster.metadata_dsn)
        try:
            await members.upsert_worker(con, "shard-1-dead", "shard-1", f"http://127.0.0.1:{free_port()}", 1)
        finally:
            await con.close()
        for round_ in range(4):
            for peer in peers:
                assert (await api.send(token, peer, f"round {round_}")).status == 200
                assert (await api.list(token, peer)).status == 200
            await asyncio.sleep(0.5)
        # The new shard's worker is scraped without touching Prometheus' configuration.
        new_worker = await cluster.start_worker("shard-3")
        added = await cluster.admin(
            "POST", "/admin/shards", {"shard_id": "shard-3", "dsn": cluster.spare_dsns["shard-3"]}
        )
        await _until_scraped(prometheus, cluster, ("dialogs-worker", f"127.0.0.1:{new_worker.addresses[0][1]}", "up"))
        assert (await cluster.wait_migration(added.json["migration_id"]))["phase"] == "done"
        for peer in peers:
            await api.send(token, peer, "after the add")
        await asyncio.sleep(4)  # a few scrapes after the migration

        failures = []
        for expr in _expressions():
            if "patroni_" in expr:
                continue  # Patroni's metrics: tests/test_replicas.py evaluates those against real members
            expr = _COMPARISON.sub("", " ".join(expr.split()))
            answer = await prometheus.query(cluster.session, expr)
            if answer.get("status") != "success" or not answer["data"]["result"]:
                failures.append(f"{expr} -> {answer.get('error') or 'no data'}")
        assert failures == [], "\n".join(failures)
    finally:
        prometheus.stop()
