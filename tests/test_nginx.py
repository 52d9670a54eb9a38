"""The compose stack's nginx (configs/nginx/nginx.conf), run for real in front of a proxy.

Only the upstream addresses and the listen port are swapped for loopback ones; everything
else is the file the stack mounts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from dialogsctl.net import free_port
from tests import packages
from tests.support import ADMIN_TOKEN, Cluster

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "nginx" / "nginx.conf"


def _nginx_binary() -> str:
    packages.ensure("nginx", "nginx")
    return "nginx"


@contextlib.asynccontextmanager
async def _nginx(session: aiohttp.ClientSession, upstream: str, tmp_path: Path) -> AsyncIterator[str]:
    """configs/nginx/nginx.conf in front of ``upstream`` (host:port), on a free port; its URL."""
    binary = _nginx_binary()
    port = free_port()
    config = CONFIG.read_text()
    config, swapped = re.subn(r"server proxy-\d:8080[^;]*;", f"server {upstream};", config)
    assert swapped == 2
    config = config.replace("listen 8080;", f"listen 127.0.0.1:{port};")
    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):  # nothing outside tmp_path
        config = config.replace("http {", f"http {{\n    {kind}_temp_path {tmp_path / kind};", 1)
    config = config.replace("http {", f"http {{\n    access_log {tmp_path / 'access.log'};", 1)
    (tmp_path / "nginx.conf").write_text(config)
    # As root nginx would hand requests to workers running as nobody, who cannot enter a
    # private tmp_path: keep them root rather than widen its permissions.
    user = "user root; " if os.geteuid() == 0 else ""
    process = subprocess.Popen(
        [
            binary,
            "-p",
            str(tmp_path),
            "-c",
            str(tmp_path / "nginx.conf"),
            "-g",
            f"{user}daemon off; pid {tmp_path / 'nginx.pid'}; error_log {tmp_path / 'error.log'};",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                async with session.get(url + "/health") as response:
                    if response.status in (200, 503):  # 503: nginx answers, no proxy behind it
                        break
            except aiohttp.ClientError:
                pass
            assert process.poll() is None, (tmp_path / "error.log").read_text()
            await asyncio.sleep(0.1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
async def nginx(cluster: Cluster, tmp_path: Path) -> AsyncIterator[str]:
    async with _nginx(cluster.session, cluster.proxy_urls[0].removeprefix("http://"), tmp_path) as url:
        yield url


async def test_no_proxy_answering_is_the_services_json_503(tmp_path: Path) -> None:
    """With no proxy to reach, nginx answers as the service would: JSON 503 with Retry-After,
    telling a sender to retry with its Idempotency-Key (nginx cannot know whether it was stored)."""
    async with aiohttp.ClientSession() as session, _nginx(session, f"127.0.0.1:{free_port()}", tmp_path) as url:
        headers = {"X-Request-ID": "lost-1", "Authorization": "Bearer x", "Idempotency-Key": "k-1"}
        async with session.post(url + f"/dialog/{uuid.uuid4()}/send", json={"text": "hi"}, headers=headers) as response:
            assert response.status == 503 and response.content_type == "application/json"
            assert response.headers["Retry-After"] == "1" and response.headers["X-Request-ID"] == "lost-1"
            error = await response.json()
    assert error["code"] == 50305 and error["request_id"] == "lost-1" and "Idempotency-Key" in error["message"]


async def test_the_clients_request_id_is_kept(cluster: Cluster, nginx: str) -> None:
    """A client's X-Request-ID reaches the proxy and comes back; an unsafe one is replaced."""
    async with cluster.session.get(nginx + "/health", headers={"X-Request-ID": "trace-abc.123"}) as response:
        assert response.headers["X-Request-ID"] == "trace-abc.123"
    async with cluster.session.get(nginx + "/user/get/not-a-uuid", headers={"X-Request-ID": "trace-7"}) as response:
        assert response.status == 400 and (await response.json())["request_id"] == "trace-7"
    async with cluster.session.get(nginx + "/health", headers={"X-Request-ID": 'a"b'}) as response:
        assert re.fullmatch(r"[0-9a-f]{32}", response.headers["X-Request-ID"])


@pytest.mark.parametrize("size", [100 * 1024, 2 * 1024 * 1024])
async def test_an_oversized_body_is_a_json_413(cluster: Cluster, nginx: str, size: int) -> None:
    """Over the proxy's 64 KiB the proxy answers; over nginx's 1 MiB nginx does: the same JSON."""
    _, token = await cluster.api.user("Anna")
    boris = await cluster.api.register("Boris")
    body = b'{"text": "' + b"x" * size + b'"}'
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}", "X-Request-ID": "big-1"}
    async with cluster.session.post(nginx + f"/dialog/{boris}/send", data=body, headers=headers) as response:
        assert response.status == 413
        assert response.content_type == "application/json"
        error = await response.json()
    assert error["code"] == 41301 and error["request_id"] == "big-1" and "too large" in error["message"]


@pytest.mark.parametrize("path", ["/admin/shards", "/metrics", "/discovery/prometheus?role=worker"])
async def test_operator_endpoints_stay_inside(cluster: Cluster, nginx: str, path: str) -> None:
    """The public port does not pass on the admin API, metrics or discovery (a JSON 404)."""
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with cluster.session.get(nginx + path, headers=headers) as response:
        assert response.status == 404
        assert (await response.json())["code"] == 40401
    async with cluster.session.get(cluster.proxy_urls[0] + path, headers=headers) as response:
        assert response.status == 200  # the proxy itself still serves it
