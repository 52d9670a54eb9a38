"""A real Prometheus for tests: Debian's package, installed when missing, run on loopback."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from dialogsctl.net import free_port
from tests import packages


def ensure_installed() -> None:
    """Debian's prometheus package (it brings promtool), installed if missing and we can."""
    if shutil.which("prometheus") and shutil.which("promtool"):
        return
    # Installed with services held (packages.services_held): no system Prometheus is started,
    # so there is nothing to stop; the tests run their own, on free ports.
    packages.ensure("prometheus", "prometheus", "promtool")


class Prometheus:
    """Scraping ``proxies``, ``workers`` and ``patroni`` members' REST APIs (host:port), or,
    given ``discovery`` (a proxy's URL), whatever that proxy's /discovery/prometheus names
    for each, as configs/prometheus does."""

    def __init__(
        self,
        workdir: Path,
        rules: Path,
        proxies: list[str] | None = None,
        workers: list[str] | None = None,
        discovery: str | None = None,
        patroni: list[str] | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        shutil.copy(rules, workdir / "alerts.yml")
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": ["alerts.yml"],
            "scrape_configs": [
                {
                    "job_name": "patroni" if role == "patroni" else f"dialogs-{role}",
                    **(
                        {
                            "http_sd_configs": [
                                {"url": f"{discovery}/discovery/prometheus?role={role}", "refresh_interval": "1s"}
                            ]
                        }
                        if discovery
                        else {"static_configs": [{"targets": targets or []}]}
                    ),
                }
                for role, targets in (("proxy", proxies), ("worker", workers), ("patroni", patroni))
                if discovery or role != "patroni" or patroni
            ],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={self.workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=open(self.workdir / "prometheus.log", "wb"),  # noqa: SIM115 - the child holds it
            stderr=subprocess.STDOUT,
        )

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    async def targets(self, session: aiohttp.ClientSession) -> list[tuple[str, str, str]]:
        """Active targets as (job, instance, health)."""
        async with session.get(self.url + "/api/v1/targets") as response:
            active = (await response.json())["data"]["activeTargets"]
        return sorted((t["labels"]["job"], t["labels"]["instance"], t["health"]) for t in active)

    async def query(self, session: aiohttp.ClientSession, expr: str) -> dict[str, Any]:
        async with session.get(self.url + "/api/v1/query", params={"query": expr}) as response:
            return await response.json()

    async def wait_ready(self, session: aiohttp.ClientSession, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                async with session.get(self.url + "/-/ready") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
        raise AssertionError(
            "prometheus did not become ready: " + (self.workdir / "prometheus.log").read_text()[-2000:]
        )
