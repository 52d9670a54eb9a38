"""`dialogs up` as a user runs it: a subprocess, used over HTTP, stopped with Ctrl-C, started again."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from dialogsctl import pg_home, postmaster
from dialogsctl.cluster import ClusterLayout
from dialogsctl.net import free_port
from dialogsctl.supervisor import replicated_group
from tests.local_cluster import cluster_processes, remove_server_data
from tests.prometheus import ensure_installed

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


class Runner:
    """Starts `dialogs` commands; stops whatever is still running at teardown, also on failure."""

    def __init__(self, data_dir: Path, port: int) -> None:
        self.data_dir = data_dir
        self.port = port
        self.env = {**os.environ, "DIALOGS_DATA_DIR": str(data_dir), "DIALOGS_PROXY_PORT": str(port)}
        self.processes: list[subprocess.Popen[str]] = []

    def up(self, *args: str) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            [sys.executable, "-m", "dialogsctl", "up", *args],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.processes.append(process)
        return process

    def run(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "dialogsctl", *args],
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def wait_healthy(self, process: subprocess.Popen[str], timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            try:
                if self.call("GET", "/health")[0] == 200:
                    return
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.2)
        raise AssertionError("the local cluster did not become healthy")

    def call(self, method: str, path: str, body: Any = None, token: str | None = None) -> tuple[int, Any]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}",
            method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def stop(self, process: subprocess.Popen[str], timeout: float = 60) -> str:
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=timeout)
        return output

    def leftovers(self) -> list[psutil.Process]:
        return cluster_processes(self.data_dir)

    def cleanup(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        for proc in self.leftovers():
            proc.kill()
        remove_server_data(self.data_dir)


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[Runner]:
    runner = Runner(tmp_path / "cluster", free_port())
    try:
        yield runner
    finally:
        runner.cleanup()


def test_up_use_stop_and_start_again(runner: Runner) -> None:
    """The README's flow on a real local cluster, resharding with the CLI included; data, tokens
    and ports survive a restart."""
    first = runner.up()
    runner.wait_healthy(first)

    status, anna = runner.call(
        "POST", "/user/register", {"first_name": "Anna", "second_name": "L", "password": "password-a"}
    )
    assert status == 200
    _, boris = runner.call(
        "POST", "/user/register", {"first_name": "Boris", "second_name": "L", "password": "password-b"}
    )
    _, login = runner.call("POST", "/login", {"id": anna["user_id"], "password": "password-a"})
    token = login["token"]
    assert runner.call("POST", f"/dialog/{boris['user_id']}/send", {"text": "persist me"}, token)[0] == 200

    second = runner.run("up")
    assert second.returncode == 1
    assert "already running" in second.stdout

    report = runner.run("status")
    assert report.returncode == 0, report.stdout + report.stderr
    assert "active map version 1" in report.stdout
    assert "shard-1" in report.stdout and "shard-2" in report.stdout
    assert "no migration running" in report.stdout
    layout = json.loads((runner.data_dir / "cluster.json").read_text())
    # Piped, nothing is cut to 80 columns: every worker URL is there whole.
    for shard in layout["shards"]:
        assert f"http://127.0.0.1:{shard['worker_port']}" in report.stdout, report.stdout
    assert runner.run("migration", "list").stdout.strip() == "no migrations yet (`dialogs shard add` starts one)"
    admin_token = runner.run("admin-token").stdout.strip()
    assert admin_token == layout["admin_token"]
    # Any deployment, by URL and token, as JSON.
    remote = runner.run(
        "status",
        "--url",
        f"http://127.0.0.1:{runner.port}",
        "--token",
        admin_token,
        "--json",
        env={"DIALOGS_DATA_DIR": str(runner.data_dir / "elsewhere")},
    )
    assert remote.returncode == 0, remote.stderr
    assert json.loads(remote.stdout)["map_version"] == 1
    assert json.loads(remote.stdout)["replication"] == {}  # no database is replicated

    added = runner.run("shard", "add")
    assert added.returncode == 0, added.stdout + added.stderr
    assert "add shard-3, map 1 -> 2, phase done" in added.stdout
    assert "shard-3 is ready after" in added.stdout
    removed = runner.run("shard", "remove", "shard-1")
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert "remove shard-1, map 2 -> 3, phase done" in removed.stdout
    report = runner.run("status")
    assert "active map version 3" in report.stdout and "shard-3" in report.stdout
    listed = runner.run("migration", "list")
    assert "phase done" in listed.stdout and listed.stdout.count("\n") == 2
    status, messages = runner.call("GET", f"/dialog/{boris['user_id']}/list", token=token)
    assert status == 200 and [m["text"] for m in messages] == ["persist me"]

    output = runner.stop(first)
    assert first.returncode == 0, output
    assert "Dialogs is up" in output and "curl -s" in output
    if os.geteuid() == 0:  # tmp_path is 0700: the data is kept elsewhere, and the output says so once
        assert output.count("its data is kept in /var/lib/dialogs/data") == 1, output
        assert stat.S_IMODE(runner.data_dir.parent.stat().st_mode) == 0o700
    time.sleep(0.5)
    assert runner.leftovers() == []

    again = runner.up()
    runner.wait_healthy(again)
    status, messages = runner.call("GET", f"/dialog/{boris['user_id']}/list", token=token)
    assert status == 200
    assert [m["text"] for m in messages] == ["persist me"]
    runner.stop(again)
    assert again.returncode == 0


def test_status_without_a_cluster(runner: Runner) -> None:
    """`dialogs status` on an empty data folder says what to do."""
    report = runner.run("status")
    assert report.returncode == 1
    assert f"no local cluster in {runner.data_dir.resolve()}" in report.stderr
    assert "--data-dir" in report.stderr and "--url and --token" in report.stderr


def test_process_refuses_bad_configuration(runner: Runner) -> None:
    """A proxy started with a bad setting exits 2 with a sentence, not a traceback."""
    env = {
        **runner.env,
        "DIALOGS_METADATA_DSN": "postgresql://x@127.0.0.1:1/db",
        "DIALOGS_JWT_SECRET": "short",
        "DIALOGS_INTERNAL_SECRET": "i" * 32,
    }
    result = subprocess.run([sys.executable, "-m", "proxy"], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "configuration error" in result.stderr and "DIALOGS_JWT_SECRET" in result.stderr
    assert "Traceback" not in result.stderr


def test_up_with_prometheus(runner: Runner) -> None:
    """`dialogs up --with-prometheus` runs Prometheus scraping each proxy process and every worker."""
    ensure_installed()
    runner.env["DIALOGS_PROCESSES"] = "2"
    process = runner.up("--with-prometheus")
    runner.wait_healthy(process)
    layout = json.loads((runner.data_dir / "cluster.json").read_text())
    url = f"http://127.0.0.1:{layout['prometheus_port']}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(url + "/api/v1/targets", timeout=2) as response:
                targets = json.loads(response.read())["data"]["activeTargets"]
            healthy = sorted(t["labels"]["job"] for t in targets if t["health"] == "up")
            if healthy == ["dialogs-proxy", "dialogs-proxy", "dialogs-worker", "dialogs-worker"]:
                break
        except (urllib.error.URLError, ConnectionError):
            pass
        assert time.monotonic() < deadline, "prometheus never scraped the whole cluster"
        time.sleep(0.5)
    output = runner.stop(process)
    assert process.returncode == 0 and "prometheus     http://127.0.0.1:" in output
    time.sleep(0.5)
    assert runner.leftovers() == []


def test_killed_postgres_servers_are_restarted(runner: Runner) -> None:
    """kill -9 of the metadata's and a shard's postmaster (one with a backend busy in a query):
    the supervisor restarts both, and the cluster serves again with nobody acting."""
    process = runner.up()
    runner.wait_healthy(process)
    layout = ClusterLayout.load(runner.data_dir)
    assert layout is not None
    shard = layout.shard("shard-1")
    assert shard is not None
    busy = subprocess.Popen(
        [
            str(pg_home.WHEEL_BIN / "psql"),
            layout.shard_dsn(shard),
            "-c",
            "SELECT count(*) FROM generate_series(1, 10000000000)",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(1)
        killed = {}
        for name in ("meta", "shard-1"):
            pid = postmaster.read_pid(layout.pg_dir(name).resolve())
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            killed[name] = pid
        deadline = time.monotonic() + 60
        while True:
            report = runner.run("status")
            if report.returncode == 0 and "unreachable" not in report.stdout:
                break
            assert time.monotonic() < deadline, f"not restarted: {report.stdout}{report.stderr}"
            time.sleep(0.5)
        for name, old in killed.items():
            assert postmaster.read_pid(layout.pg_dir(name).resolve()) not in (None, old)
        status, _ = runner.call(
            "POST", "/user/register", {"first_name": "After", "second_name": "Crash", "password": "password-c"}
        )
        assert status == 200
    finally:
        busy.kill()
        busy.wait()
    output = runner.stop(process)
    assert process.returncode == 0, output
    assert "PostgreSQL meta is back" in output and "PostgreSQL shard-1 is back" in output, output


def _closed(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def test_refused_shard_add_leaves_nothing_running(runner: Runner) -> None:
    """A local `shard add` the proxy refuses stops the server and worker it started, forgets the
    shard and removes its data folder; the same name can be added right after."""
    process = runner.up()
    runner.wait_healthy(process)
    refused = runner.run("shard", "add", "--token", "not-the-admin-token-0123456789")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "invalid admin token" in refused.stderr
    started = re.search(
        r"starting shard-3: PostgreSQL on 127\.0\.0\.1:(\d+).*starting its worker on :(\d+)", refused.stdout, re.DOTALL
    )
    assert started is not None, refused.stdout
    assert _closed(int(started[1])) and _closed(int(started[2]))
    layout = ClusterLayout.load(runner.data_dir)
    assert layout is not None and layout.shard("shard-3") is None
    assert not os.path.lexists(runner.data_dir / "pg" / "shard-3")
    added = runner.run("shard", "add")
    assert added.returncode == 0, added.stdout + added.stderr
    assert "add shard-3, map 1 -> 2, phase done" in added.stdout
    output = runner.stop(process)
    assert "stopped shard shard-3: its addition was taken back" in output, output


def test_new_shard_that_cannot_start_fails_alone(runner: Runner) -> None:
    """A new shard whose PostgreSQL cannot start (its port is taken) is reported; the cluster runs on."""
    process = runner.up()
    runner.wait_healthy(process)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        layout = ClusterLayout.load(runner.data_dir)
        assert layout is not None
        layout.add_shard("shard-9").pg_port = taken.getsockname()[1]
        layout.save()
        process.send_signal(signal.SIGHUP)
        log = layout.log_file("pg-shard-9")
        deadline = time.monotonic() + 30
        while "could not" not in (log.read_text() if log.exists() else ""):
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            assert time.monotonic() < deadline, "shard-9's server was never tried"
            time.sleep(0.2)
        time.sleep(1)
        assert process.poll() is None
        assert runner.call("GET", "/health")[0] == 200
    output = runner.stop(process)
    assert process.returncode == 0, output
    assert "could not start shard shard-9" in output, output


def test_two_shard_adds_at_once_lose_nothing(runner: Runner) -> None:
    """Two local `dialogs shard add` started together under a writer: each takes a name of its
    own (cluster.json is changed under a lock), one that is refused takes back only the
    shard it started, and every acknowledged message is readable exactly once after."""
    process = runner.up()
    runner.wait_healthy(process)
    user = {
        "second_name": "Test",
        "password": "password-1",
        "birthdate": "1990-05-17",
        "city": "Moscow",
        "biography": "reads",
    }
    anna = runner.call("POST", "/user/register", {"first_name": "Anna", **user})[1]["user_id"]
    token = runner.call("POST", "/login", {"id": anna, "password": "password-1"})[1]["token"]
    peers = [runner.call("POST", "/user/register", {"first_name": f"P{i}", **user})[1]["user_id"] for i in range(12)]
    acked: dict[str, list[str]] = {peer: [] for peer in peers}
    failures: list[int] = []
    stop = threading.Event()

    def write() -> None:
        for number in itertools.count():
            if stop.is_set():
                return
            peer = peers[number % len(peers)]
            status, body = runner.call("POST", f"/dialog/{peer}/send", {"text": f"m{number}"}, token=token)
            if status == 200:
                acked[peer].append(body["id"])
            else:
                failures.append(status)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        adds = [
            subprocess.Popen(
                [sys.executable, "-m", "dialogsctl", "shard", "add"],
                env=runner.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for _ in range(2)
        ]
        outputs = [add.communicate(timeout=180)[0] for add in adds]
    finally:
        stop.set()
        writer.join()
    assert failures == []
    assert sum(add.returncode == 0 for add in adds) >= 1, outputs
    names = sorted({m for out in outputs for m in re.findall(r"starting (shard-\d+):", out)})
    assert names == ["shard-3", "shard-4"], outputs
    layout = ClusterLayout.load(runner.data_dir)
    assert layout is not None
    in_map = {entry["shard_id"] for entry in runner.call("GET", "/admin/map", token=layout.admin_token)[1]["shards"]}
    for name in names:  # a shard is either serving or gone without a trace
        kept = layout.shard(name) is not None
        assert kept == (name in in_map), (name, in_map, outputs)
        assert kept == os.path.lexists(runner.data_dir / "pg" / name), (name, outputs)
    for peer in peers:
        listed, before = [], None
        while True:
            query = f"?limit=1000&before={before}" if before else "?limit=1000"
            status, page = runner.call("GET", f"/dialog/{peer}/list{query}", token=token)
            assert status == 200
            if not page:
                break
            listed += page
            before = page[-1]["id"]
        assert [m["id"] for m in reversed(listed)] == acked[peer]
    runner.stop(process)


@pytest.mark.timeout(420)
def test_up_with_replicas_switches_over_adds_a_shard_and_restarts_a_lost_member(runner: Runner) -> None:
    """`dialogs up --replicas 1`: every database a primary and a synchronous standby under
    Patroni; `dialogs status` shows them; `dialogs shard switchover` moves the primary with
    the API answering throughout; a member whose Patroni is killed is started again and
    rejoins as a standby; `dialogs shard add` makes the new shard a replicated group too.
    Nothing acknowledged is lost on the way."""
    process = runner.up("--replicas", "1", "--shards", "1")
    runner.wait_healthy(process, timeout=180)
    anna = runner.call("POST", "/user/register", {"first_name": "Anna", "second_name": "T", "password": "password-a"})
    boris = runner.call("POST", "/user/register", {"first_name": "Boris", "second_name": "T", "password": "password-b"})
    a, b = anna[1]["user_id"], boris[1]["user_id"]
    token = runner.call("POST", "/login", {"id": a, "password": "password-a"})[1]["token"]

    def send(text: str) -> None:
        status, body = runner.call("POST", f"/dialog/{b}/send", {"text": text}, token=token)
        assert status == 200, body

    def roles(*remote: str) -> dict[str, list[tuple[str, str]]]:
        report = runner.run("status", "--json", *remote)
        assert report.returncode == 0, report.stderr
        replication = json.loads(report.stdout)["replication"]
        return {name: sorted((m["role"], m["state"]) for m in members) for name, members in replication.items()}

    send("before")
    assert roles() == {name: [("primary", "running"), ("sync standby", "streaming")] for name in ("meta", "shard-1")}, (
        roles()
    )
    # The same through the admin API, as of a deployment (the proxy asks the members' Patroni).
    admin = ("--url", f"http://127.0.0.1:{runner.port}", "--token", runner.run("admin-token").stdout.strip())
    assert roles(*admin) == roles()
    table = runner.run("status", *admin)
    assert table.returncode == 0 and "sync standby" in table.stdout and "streaming" in table.stdout, table.stdout
    switched = runner.run("shard", "switchover", "shard-1")
    assert switched.returncode == 0, switched.stdout + switched.stderr
    assert "follows it as a standby" in switched.stdout
    send("after the switchover")
    layout = ClusterLayout.load(runner.data_dir)
    assert layout is not None
    # The host of shard-1's standby is lost: its Patroni and PostgreSQL killed.
    group = replicated_group(layout, "shard-1")
    primary = group.primary()
    standby = next(member for member in group.members if member is not primary)
    lost = standby.patroni_processes() + standby.postgres_processes()
    assert lost
    for proc in lost:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    send("while a standby is lost")  # not strict: the primary goes on alone
    deadline = time.monotonic() + 90
    while roles()["shard-1"] != [("primary", "running"), ("sync standby", "streaming")]:
        assert time.monotonic() < deadline, roles()
        time.sleep(1)
    # `dialogs shard add` on a replicated cluster: the new shard is a group of its own, its
    # members registered for switchovers and found by Prometheus' discovery.
    added = runner.run("shard", "add", timeout=180)
    assert added.returncode == 0, added.stdout + added.stderr
    assert "add shard-2, map 1 -> 2, phase done" in added.stdout, added.stdout
    assert roles()["shard-2"] == [("primary", "running"), ("sync standby", "streaming")], roles()
    layout = ClusterLayout.load(runner.data_dir)
    assert layout is not None
    status, targets = runner.call("GET", "/discovery/prometheus?role=patroni")
    members = [f"127.0.0.1:{rest}" for name in ("meta", "shard-1", "shard-2") for _, rest in layout.members(name)]
    assert status == 200 and targets == [{"targets": sorted(members), "labels": {}}], targets
    send("after the shard add")
    # …and `dialogs shard remove` retires it: its group is stopped, shard-1 keeps running.
    removed = runner.run("shard", "remove", "shard-2", timeout=180)
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert "remove shard-2, map 2 -> 3, phase done" in removed.stdout, removed.stdout
    retired = replicated_group(layout, "shard-2").members
    deadline = time.monotonic() + 60
    while any(m.patroni_processes() or m.postgres_processes() for m in retired):
        assert time.monotonic() < deadline, "the retired shard's servers still run"
        time.sleep(0.5)
    assert set(roles()) == {"meta", "shard-1"}, roles()
    status, listed = runner.call("GET", f"/dialog/{b}/list", token=token)
    assert status == 200 and [m["text"] for m in listed] == [
        "after the shard add",
        "while a standby is lost",
        "after the switchover",
        "before",
    ]
    output = runner.stop(process)
    assert process.returncode == 0, output
    assert f"Patroni {standby.name} started again" in output, output
    assert not runner.leftovers()
