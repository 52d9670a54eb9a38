"""`make compose-check`: the production stack run for real, as the README and docs say.

Needs a Docker engine and compose (`docker compose`, or Debian's `docker-compose`); `make
test` never runs it. Everything happens in a copy of the checkout in a temporary folder,
as a compose project of its own (`dialogscheck<random>`) on free host ports, so it touches
no stack of the operator's; at the end it removes what it started: containers, network,
volumes (the `dialogs:latest` image it built stays, as `docker compose up --build` would
leave it).

The steps, each the text of README.md or docs/resharding.md where there is one:
1. `cp .env.example .env`, every secret set, `docker compose up -d` (README);
2. every container healthy (or running, for those without a healthcheck);
3. the README's API walkthrough through nginx, on the public port;
4. Prometheus has discovered every proxy and worker, and scrapes them all;
5. writers start (sequential sends per dialog, each retried with its Idempotency-Key);
6. a third shard added with docs/resharding.md's compose steps, under those writes;
7. a worker container killed (it stays down: an operator's stop) while its shard is
   served by the other, then started again; a worker process killed from the host (Docker
   restarts its container);
8. every acknowledged message readable once, in order; `down` and `up` keep them all.
Where the machine has no Grafana image (see ../shared/compose-standins), Grafana is left
out of `up` and said so.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dialogsctl.net import free_port

ROOT = Path(__file__).resolve().parents[1]
GRAFANA = "grafana"


def say(message: str) -> None:
    print(f"[compose-check {time.strftime('%H:%M:%S')}] {message}", flush=True)


def example(document: Path, name: str) -> str:
    """The fenced block after ``<!-- example: NAME -->`` in ``document``, dedented."""
    match = re.search(rf"<!-- example: {name}\b[^>]*-->\n( *)```\w*\n(.*?)\n *```", document.read_text(), re.DOTALL)
    if match is None:
        raise SystemExit(f"{document.name} has no example {name!r}")
    return textwrap.dedent(match.group(2))


class Stack:
    """One compose project in a copy of the checkout; every command runs in that folder."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="dialogs-compose-check-"))
        self.project = f"dialogscheck{uuid.uuid4().hex[:8]}"
        self.image = f"dialogs-check:{self.project}"
        self.ports = {
            name: free_port() for name in ("DIALOGS_HTTP_PORT", "DIALOGS_ADMIN_PORT", "PROMETHEUS_PORT", "GRAFANA_PORT")
        }
        self.docker = shutil.which("docker") or "docker"  # the real one: the shim below comes first on PATH
        self.network = _free_network(self.docker)
        self.compose = [self.docker, "compose"] if _has_compose_plugin(self.docker) else ["docker-compose"]
        self.grafana = _image_present(self.docker, "grafana/grafana:11.3.0")
        self.shim = self.folder / ".shim"
        # Nothing of the operator's own stack leaks in: a variable of .env.example (or a
        # COMPOSE_* one) exported in their shell would win over this stack's .env.
        names = set(re.findall(r"^#? ?([A-Z_]+)=", (ROOT / ".env.example").read_text(), re.M))
        inherited = {k: v for k, v in os.environ.items() if k not in names and not k.startswith("COMPOSE_")}
        self.env = {**inherited, "COMPOSE_PROJECT_NAME": self.project, "PATH": f"{self.shim}:{os.environ['PATH']}"}

    # --- set-up -------------------------------------------------------------------------

    def copy_checkout(self) -> None:
        """The files git knows (and new ones not ignored), plus a link to the checkout's .venv."""
        listed = (
            subprocess.run(
                ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True, capture_output=True
            )
            .stdout.decode()
            .split("\0")
        )
        for name in filter(None, listed):
            source = ROOT / name
            if source.is_file():
                (self.folder / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, self.folder / name)
        (self.folder / ".venv").symlink_to(ROOT / ".venv")
        self._write_shim()

    def _write_shim(self) -> None:
        """`docker compose …` as the docs write it, run by the compose this machine has; on a
        machine without a Grafana image, an `up -d` that names no services starts all but it."""
        self.shim.mkdir()
        compose = " ".join(self.compose)
        skip = "" if self.grafana else f" | grep -vx {GRAFANA}"
        (self.shim / "docker").write_text(
            textwrap.dedent(f"""\
            #!/bin/sh
            if [ "$1" = compose ]; then
                shift
                case "$*" in
                    "up -d"|"up -d --build") exec {compose} "$@" $({compose} config --services{skip}) ;;
                esac
                exec {compose} "$@"
            fi
            exec {self.docker} "$@"
            """)
        )
        (self.shim / "docker").chmod(0o755)

    def services(self, without_grafana: bool = False) -> list[str]:
        out = self.run_compose("config", "--services", capture=True)
        names = out.split()
        return [n for n in names if not (without_grafana and n == GRAFANA)]

    def write_secrets(self) -> None:
        """What the README's comment asks: set every secret in .env (and the free ports)."""
        env = self.folder / ".env"
        text = env.read_text()
        for name, length in (
            ("POSTGRES_PASSWORD", 24),
            ("POSTGRES_REPLICATION_PASSWORD", 24),
            ("DIALOGS_JWT_SECRET", 48),
            ("DIALOGS_INTERNAL_SECRET", 32),
            ("DIALOGS_ADMIN_TOKEN", 32),
            ("GRAFANA_ADMIN_PASSWORD", 16),
        ):
            text, replaced = re.subn(rf"^{name}=.*$", f"{name}={secrets.token_urlsafe(length)}", text, flags=re.M)
            assert replaced == 1, name
        text += "".join(f"{name}={port}\n" for name, port in self.ports.items())
        text += f"DIALOGS_IMAGE={self.image}\nDIALOGS_NET={self.network}\n"
        env.write_text(text)
        env.chmod(0o600)

    # --- running --------------------------------------------------------------------------

    def sh(self, script: str, timeout: float = 600) -> str:
        """A documented block, run in bash with errors fatal, from the stack's folder."""
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=self.folder,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if result.returncode != 0:
            raise AssertionError(f"failed: {script}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result.stdout

    def run_compose(self, *args: str, capture: bool = False, timeout: float = 900) -> str:
        result = subprocess.run(
            self.compose + list(args), cwd=self.folder, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if result.returncode != 0:
            raise AssertionError(f"{' '.join(args)}: {result.stderr[-3000:]}")
        return result.stdout

    def container(self, service: str) -> str:
        return self.run_compose("ps", "-a", "-q", service, capture=True).strip()

    def inspect(self, service: str) -> dict[str, Any]:
        out = subprocess.run(
            [self.docker, "inspect", self.container(service)], capture_output=True, text=True, check=True
        ).stdout
        return json.loads(out)[0]

    def wait_healthy(self, services: list[str], timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        pending = list(services)
        while pending:
            state = {}
            for service in pending:
                if service == "bootstrap":
                    continue
                try:
                    info = self.inspect(service)["State"]
                except (subprocess.CalledProcessError, IndexError, json.JSONDecodeError):
                    state[service] = "absent"
                    continue
                state[service] = info["Health"]["Status"] if "Health" in info else info["Status"]
            pending = [s for s, status in state.items() if status not in ("healthy", "running")]
            if not pending:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"not healthy after {timeout:.0f} s: {state}")
            time.sleep(2)

    def url(self, port_name: str) -> str:
        return f"http://127.0.0.1:{self.ports[port_name]}"

    def teardown(self) -> None:
        try:
            self.run_compose("down", "-v", "--remove-orphans", "--timeout", "10", timeout=300)
        except Exception as exc:  # noqa: BLE001 - report, then still remove the image and the folder
            say(f"could not take the stack down: {exc}")
        subprocess.run([self.docker, "image", "rm", "-f", self.image], capture_output=True, timeout=120)
        shutil.rmtree(self.folder, ignore_errors=True)

    def patroni_base_image(self) -> None:
        """configs/patroni builds on postgres:18-bookworm. Where no registry is reachable, the
        machine's postgres:18 stand-in is a bookworm image: tag it so (when it says it is one)."""
        wanted = "postgres:18-bookworm"
        if _image_present(self.docker, wanted) or not _image_present(self.docker, "postgres:18"):
            return
        release = subprocess.run(
            [self.docker, "run", "--rm", "--entrypoint", "cat", "postgres:18", "/etc/os-release"],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        if "VERSION_CODENAME=bookworm" in release:
            subprocess.run([self.docker, "tag", "postgres:18", wanted], check=True, capture_output=True)
            say(f"tagged this machine's postgres:18 (bookworm) as {wanted}")

    def kill_process_of(self, service: str) -> bool:
        """SIGKILL the main process of ``service``'s container from the host, as a crash would.
        Only where the container's processes are this host's (not a VM's, not a remote
        engine's) and this user may signal them: the pid must belong to that container."""
        info = self.inspect(service)
        pid, container = info["State"]["Pid"], info["Id"]
        try:
            if container not in Path(f"/proc/{pid}/cgroup").read_text():
                return False
            os.kill(pid, signal.SIGKILL)
        except (OSError, PermissionError):
            return False
        return True


def _has_compose_plugin(docker: str) -> bool:
    return subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0


def _image_present(docker: str, name: str) -> bool:
    return subprocess.run([docker, "image", "inspect", name], capture_output=True).returncode == 0


def _free_network(docker: str) -> str:
    """The first three octets of a /24 that no Docker network on this host uses."""
    ids = subprocess.run([docker, "network", "ls", "-q"], capture_output=True, text=True).stdout.split()
    used = subprocess.run(
        [docker, "network", "inspect", "-f", "{{range .IPAM.Config}}{{.Subnet}} {{end}}", *ids],
        capture_output=True,
        text=True,
    ).stdout
    for third in range(81, 255):
        if f"172.30.{third}." not in used:
            return f"172.30.{third}"
    raise SystemExit("no free 172.30.x.0/24 for the check's network")


def call(
    method: str, url: str, body: Any = None, token: str | None = None, key: str | None = None, timeout: float = 15
) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if key:
        headers["Idempotency-Key"] = key
    request = urllib.request.Request(
        url, method=method, headers=headers, data=json.dumps(body).encode() if body is not None else None
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        raw = error.read()
        try:
            return error.code, json.loads(raw or b"null")
        except ValueError:  # not the service's JSON: nginx's own page, say
            return error.code, raw.decode(errors="replace")[:200]


# --- writers -------------------------------------------------------------------------------


@dataclass
class Writers:
    """Senders over a few dialogs through nginx: one sender per dialog, each send retried with
    its Idempotency-Key until it is acknowledged (bounded), so acknowledged order is the order
    the dialog must list."""

    base: str
    token: str
    peers: list[str]
    acked: dict[str, list[str]] = field(default_factory=dict)
    acked_at: dict[str, list[float]] = field(default_factory=dict)  # time.monotonic() of each
    retries: int = 0
    # (when the attempt started, peer, status (0: no answer), error code): every failed attempt
    failed: list[tuple[float, str, int, int]] = field(default_factory=list)
    gave_up: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        for peer in self.peers:
            self.acked[peer] = []
            thread = threading.Thread(target=self._send, args=(peer,), daemon=True)
            thread.start()
            self.threads.append(thread)

    def _send(self, peer: str) -> None:
        number = 0
        deadline = time.monotonic() + 1800  # a bound of its own, whatever happens to the stack
        while not self.stop.is_set() and time.monotonic() < deadline:
            key = f"check-{peer[:8]}-{number}"
            for _attempt in range(60):
                started = time.monotonic()
                try:
                    # Longer than nginx waits for a proxy (which holds a send through a
                    # failover): a client that gives up sooner sees an error the stack did not make.
                    status, body = call(
                        "POST", f"{self.base}/dialog/{peer}/send", {"text": f"m{number}"}, self.token, key, timeout=60
                    )
                except (urllib.error.URLError, OSError):
                    status, body = 0, None
                if status == 200:
                    self.acked[peer].append(body["id"])
                    self.acked_at.setdefault(peer, []).append(time.monotonic())
                    break
                self.retries += 1
                code = body.get("code", 0) if isinstance(body, dict) else 0
                self.failed.append((started, peer, status, code))
                time.sleep(0.5)
            else:
                self.gave_up.append(key)
            number += 1
            time.sleep(0.05)

    def finish(self) -> int:
        assert all(thread.is_alive() for thread in self.threads), "a writer died before the end (see its traceback)"
        self.stop.set()
        for thread in self.threads:
            thread.join(60)
        return sum(len(ids) for ids in self.acked.values())

    def check(self) -> None:
        """Every acknowledged message listed once, in order (paged to the first page that is empty)."""
        for peer, ids in self.acked.items():
            listed: list[str] = []
            before = None
            while True:
                query = f"?limit=1000&before={before}" if before else "?limit=1000"
                status, page = call("GET", f"{self.base}/dialog/{peer}/list{query}", token=self.token)
                assert status == 200, page
                if not page:
                    break
                listed += [m["id"] for m in page]
                before = page[-1]["id"]
            assert list(reversed(listed)) == ids, f"dialog with {peer}: listed {len(listed)}, acknowledged {len(ids)}"


# --- the check -----------------------------------------------------------------------------


def prometheus_targets(stack: Stack) -> dict[str, list[dict[str, Any]]]:
    status, body = call("GET", stack.url("PROMETHEUS_PORT") + "/api/v1/targets?state=active")
    assert status == 200, body
    jobs: dict[str, list[dict[str, Any]]] = {}
    for target in body["data"]["activeTargets"]:
        jobs.setdefault(target["labels"]["job"], []).append(target)
    return jobs


def wait_for(what: str, probe: Any, timeout: float = 120, interval: float = 2) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = probe()
        except (AssertionError, urllib.error.URLError, OSError, KeyError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout:.0f} s (last: {last!r})")


def peers_on(stack: Stack, user: str, peers: list[str], shard_id: str) -> list[str]:
    """The peers whose dialog with ``user`` the active map puts on ``shard_id``."""
    from dialogs.keys import dialog_key
    from dialogs.shard_map import ShardMap

    status, body = call(
        "GET", stack.url("DIALOGS_ADMIN_PORT") + "/admin/map", token=_env_value(stack, "DIALOGS_ADMIN_TOKEN")
    )
    assert status == 200, body
    active = ShardMap.from_json(body)
    return [p for p in peers if active.owner(dialog_key(uuid.UUID(user), uuid.UUID(p))) == shard_id]


def live_workers(stack: Stack, shard_id: str) -> float:
    status, body = call(
        "GET",
        stack.url("PROMETHEUS_PORT")
        + "/api/v1/query?query="
        + urllib.parse.quote(f'min(dialogs_shard_live_workers{{shard_id="{shard_id}"}})'),
    )
    assert status == 200, body
    result = body["data"]["result"]
    return float(result[0]["value"][1]) if result else -1.0


def start_stack(stack: Stack, block: str) -> list[str]:
    """The README's block: its lines before the last (copy .env, …), every secret set, then
    its last line (`docker compose up -d --build`); every container healthy. The services."""
    *prepare, up = example(ROOT / "README.md", block).splitlines()
    say(f"stack {stack.project} in {stack.folder}; ports {stack.ports}; compose: {' '.join(stack.compose)}")
    if not stack.grafana:
        say("no Grafana image on this machine: Grafana is left out of `up` (it stays in the file)")
    for line in prepare:
        stack.sh(line)
    stack.write_secrets()
    say(f"building the images and starting the stack (README: {up.split('#')[0].strip()})")
    started = time.monotonic()
    stack.sh(up, timeout=1200)
    services = [s for s in stack.services(without_grafana=not stack.grafana) if s != "bootstrap"]
    stack.wait_healthy(services)
    say(f"every container healthy or running after {time.monotonic() - started:.0f} s: {', '.join(services)}")
    assert stack.inspect("bootstrap")["State"]["ExitCode"] == 0
    return services


def walkthrough(stack: Stack) -> None:
    """The README's API walkthrough through nginx."""
    public = stack.url("DIALOGS_HTTP_PORT")
    script = example(ROOT / "README.md", "api").replace("localhost:8080", public.removeprefix("http://"))
    lines = stack.sh(script).splitlines()
    assert len(lines) == 3 and json.loads(lines[2])[0]["text"] == "Привет!", lines
    say("README's API walkthrough through nginx: ok")


def start_writers(stack: Stack) -> tuple[str, Writers]:
    """Anna and 12 peers registered through nginx; one writer per dialog. (Anna, writers)."""
    public = stack.url("DIALOGS_HTTP_PORT")
    user = {
        "second_name": "Check",
        "password": "password-1",
        "birthdate": "1990-05-17",
        "city": "Tver",
        "biography": "checks",
    }
    anna = call("POST", public + "/user/register", {"first_name": "Anna", **user})[1]["user_id"]
    token = call("POST", public + "/login", {"id": anna, "password": "password-1"})[1]["token"]
    peers = [call("POST", public + "/user/register", {"first_name": f"P{i}", **user})[1]["user_id"] for i in range(12)]
    writers = Writers(public, token, peers)
    writers.start()
    time.sleep(3)
    return anna, writers


def add_shard_3(stack: Stack, example_name: str, services: list[str], ready: Any = None) -> None:
    """docs/resharding.md's steps under ``example_name``: the shard's file, its services up
    and healthy (and ``ready()``), then `dialogs shard add`, which must finish its migration."""
    resharding = ROOT / "docs" / "resharding.md"
    (stack.folder / "docker-compose.shard-3.yaml").write_text(example(resharding, example_name))
    stack.sh(example(resharding, f"{example_name}-up"), timeout=600)
    stack.wait_healthy(services)
    if ready is not None:
        ready()
    added = stack.sh(example(resharding, f"{example_name}-add"), timeout=600)
    assert "phase done" in added, added
    say(f"shard-3 added with docs/resharding.md's steps ({example_name}): " + added.strip().splitlines()[-1])


def finish_and_restart(stack: Stack, writers: Writers, up: str, services: list[str]) -> None:
    """Stop the writers: every acknowledged message listed once, in order; then the stack
    `down` and ``up`` again (its services healthy) still lists them all."""
    time.sleep(3)
    total = writers.finish()
    assert writers.gave_up == [], f"sends never acknowledged: {writers.gave_up}"
    writers.check()
    say(f"{total} acknowledged sends, each listed once and in order ({writers.retries} retried sends)")
    stack.run_compose("down", "--timeout", "10", timeout=300)
    stack.sh(up, timeout=600)
    stack.wait_healthy(services)
    writers.check()
    say("after `down` and `up`: every message still there")


def check(stack: Stack) -> None:
    # 1-3. README: .env, secrets, up; the API walkthrough.
    services = start_stack(stack, "compose-up")
    up = example(ROOT / "README.md", "compose-up").splitlines()[-1]
    walkthrough(stack)

    # 4. Prometheus discovers and scrapes every proxy and worker.
    def discovered() -> bool:
        jobs = prometheus_targets(stack)
        workers, proxies = jobs.get("dialogs-worker", []), jobs.get("dialogs-proxy", [])
        return len(workers) == 4 and len(proxies) == 2 and all(t["health"] == "up" for t in workers + proxies)

    wait_for("Prometheus scraping 2 proxies and 4 workers", discovered)
    say("Prometheus discovered and scrapes 2 proxies and 4 workers")

    # 5. Writers through nginx.
    anna, writers = start_writers(stack)
    peers = writers.peers

    # 6. docs/resharding.md: a third shard under writes.
    add_shard_3(stack, "compose-shard-3", ["shard-3", "worker-3a", "worker-3b"])
    wait_for("Prometheus scraping 6 workers", lambda: len(prometheus_targets(stack).get("dialogs-worker", [])) == 6)

    # 7. A worker container killed: an operator's stop; its shard is served by the other.
    on_shard_1 = peers_on(stack, anna, peers, "shard-1")
    assert on_shard_1, "no dialog of the writers is on shard-1: nothing would show it served"
    subprocess.run([stack.docker, "kill", stack.container("worker-1a")], check=True, capture_output=True)
    killed_at = time.monotonic()  # dead by now: a send started later cannot be in flight on it
    wait_for("shard-1 down to one live worker (DialogsShardWithOneWorker)", lambda: live_workers(stack, "shard-1") == 1)
    time.sleep(5)
    assert stack.inspect("worker-1a")["State"]["Status"] == "exited", "Docker restarted a container an operator killed"
    # A send in flight on worker-1a when it died may or may not have been stored: that one
    # answers 503 "retry with the same Idempotency-Key" (SendOutcomeUnknown, 50305) and is
    # retried; every send started after the kill must be served by worker-1b.
    before_kill = [f for f in writers.failed if f[0] < killed_at]
    say(f"failed attempts before the kill (the shard add included): {[(f[2], f[3]) for f in before_kill]}")
    during = [f for f in writers.failed if f[1] in on_shard_1 and f[0] >= killed_at - 10]
    in_flight = [f for f in during if f[0] < killed_at]
    after = [f for f in during if f[0] >= killed_at]
    assert after == [], f"shard-1 refused sends started after worker-1a died (at {killed_at:.3f}): {after}"
    assert all(code == 50305 for *_, code in in_flight), in_flight
    say(
        f"worker-1a killed: stays down; shard-1 ({len(on_shard_1)} of the dialogs) answered every send through"
        " worker-1b; the metric behind the alert shows 1 worker"
    )
    stack.run_compose("up", "-d", "worker-1a")
    stack.wait_healthy(["worker-1a"])
    wait_for("shard-1 back to two live workers", lambda: live_workers(stack, "shard-1") == 2)

    # A worker's process killed from the host: Docker restarts its container.
    before = stack.inspect("worker-2a")["RestartCount"]
    if stack.kill_process_of("worker-2a"):
        wait_for("worker-2a restarted by Docker", lambda: stack.inspect("worker-2a")["RestartCount"] > before)
        stack.wait_healthy(["worker-2a"])
        say("worker-2a's process killed from the host: Docker restarted its container")
    else:
        say("skipped killing a worker's process: this engine's container processes are not this host's to signal")

    # 8. Every acknowledged message once, in order; down and up keep them all.
    finish_and_restart(stack, writers, up, services + ["shard-3", "worker-3a", "worker-3b"])
    status, shards = call(
        "GET", stack.url("DIALOGS_ADMIN_PORT") + "/admin/shards", token=_env_value(stack, "DIALOGS_ADMIN_TOKEN")
    )
    assert status == 200 and sorted(s["shard_id"] for s in shards if s["in_map"]) == ["shard-1", "shard-2", "shard-3"]


# --- the replicated stack (docker-compose.ha.yaml) --------------------------------------------

GROUPS = {name: (name, f"{name}-b") for name in ("meta", "shard-1", "shard-2", "shard-3")}  # shard-3: added
_CLUSTER = (
    "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:8008/cluster', timeout=3).read().decode())"
)


def group_members(stack: Stack, group: str) -> dict[str, tuple[str, str]]:
    """{member: (role, state)} of a Patroni group, as the first of its members that answers
    (from inside its container: Patroni's REST API is not published) reports it."""
    for service in GROUPS[group]:
        result = subprocess.run(
            [stack.docker, "exec", stack.container(service), "python3", "-c", _CLUSTER],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if result.returncode == 0:
            return {m["name"]: (m["role"], m["state"]) for m in json.loads(result.stdout)["members"]}
    raise AssertionError(f"no member of {group} answers")


def leader_of(stack: Stack, group: str) -> str:
    leaders = [name for name, (role, state) in group_members(stack, group).items() if role == "leader"]
    assert len(leaders) == 1, leaders
    return leaders[0]


def replicated(stack: Stack, group: str) -> bool:
    """The group back to a running leader and a synchronous standby that replicates from it
    (Patroni before 3.1 says "running" for a standby, later ones "streaming")."""
    roles = sorted(group_members(stack, group).values())
    return (
        len(roles) == 2
        and roles[0] == ("leader", "running")
        and roles[1]
        in (
            ("sync_standby", "running"),
            ("sync_standby", "streaming"),
        )
    )


def sends_after(writers: Writers, peers: list[str], moment: float) -> tuple[list[tuple[float, str, int, int]], float]:
    """The failed attempts on ``peers`` started after ``moment``, and the seconds from
    ``moment`` to the first send on them acknowledged after it."""
    failed = [f for f in writers.failed if f[1] in peers and f[0] >= moment]
    acked = [t for peer in peers for t in writers.acked_at.get(peer, []) if t >= moment]
    return failed, (min(acked) - moment if acked else float("inf"))


def check_ha(stack: Stack) -> None:
    stack.patroni_base_image()
    services = start_stack(stack, "compose-ha-up")
    for group in ("meta", "shard-1", "shard-2"):
        wait_for(f"{group} replicated", lambda group=group: replicated(stack, group), timeout=120)
    say("every database a Patroni group: a leader and a streaming synchronous standby")
    walkthrough(stack)

    def discovered() -> bool:
        jobs = prometheus_targets(stack)
        members = jobs.get("patroni", [])
        return len(members) == 6 and all(t["health"] == "up" for t in members)

    wait_for("Prometheus scraping the 6 Patroni members", discovered)
    say("Prometheus discovered every Patroni member through the proxies")
    anna, writers = start_writers(stack)

    # A shard primary's container killed under writes: its host is gone.
    on_shard_1 = peers_on(stack, anna, writers.peers, "shard-1")
    assert on_shard_1, "no dialog of the writers is on shard-1: nothing would show its failover"
    old = leader_of(stack, "shard-1")
    subprocess.run([stack.docker, "kill", stack.container(old)], check=True, capture_output=True)
    killed_at = time.monotonic()
    new = wait_for(
        "a new shard-1 leader",
        lambda: next((m for m in GROUPS["shard-1"] if m != old and leader_of(stack, "shard-1") == m), None),
        timeout=90,
        interval=1,
    )
    wait_for(
        "a send on shard-1 acknowledged after the kill",
        lambda: sends_after(writers, on_shard_1, killed_at)[1] < float("inf"),
        timeout=60,
        interval=1,
    )
    failed, first = sends_after(writers, on_shard_1, killed_at)
    say(
        f"shard-1's primary {old} killed: {new} leads; first send on shard-1 acknowledged {first:.1f} s"
        f" after the kill; failed attempts {[(f[2], f[3]) for f in failed]}"
    )
    assert failed == [], f"clients saw errors during the failover: {failed}"
    stack.run_compose("up", "-d", old)
    wait_for(f"{old} back as shard-1's synchronous standby", lambda: replicated(stack, "shard-1"), timeout=120)
    say(f"{old} started again: it rejoined as {new}'s synchronous standby")

    # Planned switchovers, as README says an operator asks for them: a shard, then `meta`.
    on_shard_2 = peers_on(stack, anna, writers.peers, "shard-2")
    assert on_shard_2, "no dialog of the writers is on shard-2: nothing would show its switchover"
    admin = f"--url {stack.url('DIALOGS_ADMIN_PORT')} --token {_env_value(stack, 'DIALOGS_ADMIN_TOKEN')}"
    for group, peers in (("shard-2", on_shard_2), ("meta", writers.peers)):
        old = leader_of(stack, group)
        switched_at = time.monotonic()
        output = stack.sh(f".venv/bin/dialogs shard switchover {group} {admin}")
        say("switchover: " + output.strip())
        if group != "meta":  # both of the shard's workers paused their writes first
            assert "2 of 2 workers paused their writes" in output, output
        done_at = time.monotonic()
        wait_for(
            f"a send acknowledged after {group}'s switchover",
            lambda peers=peers, done_at=done_at: sends_after(writers, peers, done_at)[1] < float("inf"),
            timeout=30,
            interval=0.5,
        )
        failed, _ = sends_after(writers, peers, switched_at)
        assert failed == [], f"clients saw errors during {group}'s switchover: {failed}"
        assert leader_of(stack, group) != old
        wait_for(f"{group} replicated after the switchover", lambda group=group: replicated(stack, group), timeout=120)
    # `dialogs status --url` shows each group's members as their Patroni reports them.
    shown = json.loads(stack.sh(f".venv/bin/dialogs status --json {admin}"))["replication"]
    assert sorted(shown) == ["meta", "shard-1", "shard-2"], shown
    for group, members in shown.items():
        assert sorted(m["role"] for m in members) == ["primary", "sync standby"], (group, members)
    say("dialogs status --url: every group a primary and a synchronous standby")
    registered = call(
        "POST",
        stack.url("DIALOGS_HTTP_PORT") + "/user/register",
        {"first_name": "After", "second_name": "Switchover", "password": "password-1"},
    )
    assert registered[0] == 200, registered

    # docs/resharding.md: a replicated shard-3 added under the writes.
    add_shard_3(
        stack,
        "compose-ha-shard-3",
        ["shard-3", "shard-3-b", "worker-3a", "worker-3b"],
        ready=lambda: wait_for("shard-3 replicated", lambda: replicated(stack, "shard-3"), timeout=120),
    )
    wait_for(
        "Prometheus scraping shard-3's members too", lambda: len(prometheus_targets(stack).get("patroni", [])) == 8
    )
    services += ["shard-3", "shard-3-b", "worker-3a", "worker-3b"]
    finish_and_restart(stack, writers, example(ROOT / "README.md", "compose-ha-up").splitlines()[-1], services)


def _env_value(stack: Stack, name: str) -> str:
    match = re.search(rf"^{name}=(.*)$", (stack.folder / ".env").read_text(), re.M)
    assert match
    return match.group(1)


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    ha = "--ha" in (sys.argv[1:] if argv is None else argv)
    if shutil.which("docker") is None:
        print("compose-check needs a Docker engine (docker, and docker compose or docker-compose)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupted)  # a CI timeout tears down as Ctrl-C does
    stack = Stack()
    started = time.monotonic()
    try:
        stack.copy_checkout()
        (check_ha if ha else check)(stack)
    except BaseException as exc:
        say(f"FAILED: {type(exc).__name__}: {exc}")
        subprocess.run(stack.compose + ["ps", "-a"], cwd=stack.folder, env=stack.env)
        return 1
    finally:
        say("taking the stack down (containers, network, volumes, its image)")
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave it half down
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.teardown()
    say(f"passed in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
