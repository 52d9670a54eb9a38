"""docker-compose.yaml validates, and everything it names is in the repository."""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import packages

ROOT = Path(__file__).resolve().parents[1]
WORKERS = ("worker-1a", "worker-1b", "worker-2a", "worker-2b")


def _filled_env(folder: Path) -> Path:
    """.env.example with every secret set, as the README asks."""
    text = (ROOT / ".env.example").read_text()
    filled = re.sub(
        r"^([A-Z_]+)=$", lambda m: f"{m[1]}=set-{m[1].lower()}-0123456789abcdef0123456789", text, flags=re.M
    )
    path = folder / "filled.env"
    path.write_text(filled)
    return path


def _config(env_file: Path, *files: Path) -> dict[str, Any]:
    """The stack as docker-compose resolves it (Debian's docker-compose)."""
    packages.ensure("docker-compose", "docker-compose")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "DIALOGS_", "GRAFANA_", "COMPOSE_"))}
    args = [arg for file in files for arg in ("-f", str(file))]
    result = subprocess.run(
        ["docker-compose", "--env-file", str(env_file), *args, "config"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


@pytest.fixture(scope="module")
def compose(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The stack as docker-compose resolves it with .env.example, its secrets set."""
    return _config(_filled_env(tmp_path_factory.mktemp("env")), ROOT / "docker-compose.yaml")


def test_the_example_env_has_no_usable_placeholders() -> None:
    """Every secret in .env.example is empty: compose refuses to start until each is set, so a
    placeholder cannot be left in by mistake."""
    text = (ROOT / ".env.example").read_text()
    for name in (
        "POSTGRES_PASSWORD",
        "POSTGRES_REPLICATION_PASSWORD",
        "DIALOGS_JWT_SECRET",
        "DIALOGS_INTERNAL_SECRET",
        "DIALOGS_ADMIN_TOKEN",
        "GRAFANA_ADMIN_PASSWORD",
    ):
        assert re.search(rf"^{name}=$", text, re.M), name


def test_the_docs_shard_file_adds_a_shard_like_the_first_ones(tmp_path: Path) -> None:
    """docs/resharding.md's docker-compose.shard-3.yaml, with the stack's file: valid, and its
    workers configured as the stack's own (same variables, healthcheck, restart policy,
    waiting for their database), each registering under its own name."""
    from tests.compose_check import example

    shard_file = tmp_path / "docker-compose.shard-3.yaml"
    shard_file.write_text(example(ROOT / "docs" / "resharding.md", "compose-shard-3"))
    stack = _config(_filled_env(tmp_path), ROOT / "docker-compose.yaml", shard_file)["services"]
    for name in ("worker-3a", "worker-3b"):
        worker, model = stack[name], stack["worker-1a"]
        assert set(worker["environment"]) == set(model["environment"]), name
        assert worker["environment"]["DIALOGS_SHARD_ID"] == "shard-3"
        assert worker["environment"]["DIALOGS_WORKER_ID"] == name
        assert worker["environment"]["DIALOGS_ADVERTISE_URL"] == f"http://{name}:8081"
        assert worker["healthcheck"] == model["healthcheck"] and worker["restart"] == model["restart"]
        assert worker["image"] == model["image"] and worker["command"] == model["command"]
        assert worker["depends_on"]["shard-3"]["condition"] == "service_healthy"
    assert stack["shard-3"]["image"] == stack["shard-1"]["image"]
    assert stack["shard-3"]["healthcheck"] == stack["shard-1"]["healthcheck"]


@pytest.fixture(scope="module")
def compose_ha(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The replicated stack: docker-compose.ha.yaml over docker-compose.yaml, as README says."""
    env = _filled_env(tmp_path_factory.mktemp("env-ha"))
    return _config(env, ROOT / "docker-compose.yaml", ROOT / "docker-compose.ha.yaml")


def compose_plain_volumes(service: str) -> list[str]:
    """The volumes docker-compose.yaml itself gives ``service``."""
    return [str(v) for v in yaml.safe_load((ROOT / "docker-compose.yaml").read_text())["services"][service]["volumes"]]


def _members(dsn: str) -> list[str]:
    return urllib.parse.urlsplit(dsn).netloc.rpartition("@")[2].split(",")


def test_the_ha_stack_replicates_every_database(compose_ha: dict[str, Any]) -> None:
    """Every database a Patroni group of two members under one scope, on three etcd members;
    every service names both members of the databases it uses, and the bootstrap registers
    each group's Patroni API (switchovers, Prometheus' discovery)."""
    services = compose_ha["services"]
    groups: dict[str, list[str]] = {}
    for name, service in services.items():
        env = service.get("environment", {})
        if "PATRONI_SCOPE" in env:
            assert env["PATRONI_NAME"] == name  # its address: dialogs-patroni derives it from the name
            assert env["PATRONI_ETCD3_HOSTS"] == "etcd-1:2379,etcd-2:2379,etcd-3:2379", name
            assert env["PATRONI_REPLICATION_PASSWORD"] and env["PATRONI_SUPERUSER_PASSWORD"], name
            assert service["image"] == services["meta"]["image"] and service["restart"] == "unless-stopped", name
            groups.setdefault(env["PATRONI_SCOPE"], []).append(name)
    assert groups == {name: [name, f"{name}-b"] for name in ("meta", "shard-1", "shard-2")}
    members = [name for names in groups.values() for name in names]
    volumes = {v.split(":")[0] for name in members for v in services[name]["volumes"]}
    plain = {v.split(":")[0] for service in ("meta", "shard-1", "shard-2") for v in compose_plain_volumes(service)}
    assert len(volumes) == 6 and not volumes & plain  # a disk each, none of the plain stack's
    data_dir = yaml.safe_load((ROOT / "configs" / "patroni" / "patroni.yml").read_text())["postgresql"]["data_dir"]
    for name in members:
        [mount] = [v.split(":")[1] for v in services[name]["volumes"]]
        assert data_dir.startswith(mount + "/"), (name, mount, data_dir)  # the data is on the volume
        assert services[name]["healthcheck"]["test"][:2] == ["CMD", "psql"], name
    etcd = [name for name in services if name.startswith("etcd-")]
    assert len(etcd) == 3
    for name in etcd:
        assert services[name]["environment"]["ETCD_INITIAL_CLUSTER"].count("=http://") == 3, name
        for member in members:  # started, not healthy: two etcd members of three are a quorum
            assert services[member]["depends_on"][name]["condition"] == "service_started", (member, name)
    meta = ["meta:5432", "meta-b:5432"]
    for name, service in services.items():
        env = service.get("environment", {})
        if "DIALOGS_METADATA_DSN" in env:
            assert _members(env["DIALOGS_METADATA_DSN"]) == meta, name
        if "DIALOGS_SHARD_DSN" in env:
            shard = env["DIALOGS_SHARD_ID"]
            assert _members(env["DIALOGS_SHARD_DSN"]) == [f"{shard}:5432", f"{shard}-b:5432"], name
    for proxy in ("proxy-1", "proxy-2"):
        assert float(services[proxy]["environment"]["DIALOGS_FAILOVER_WAIT"]) > 20  # Patroni's ttl: a failover
    command = services["bootstrap"]["command"]
    options = list(zip(command[1::2], command[2::2], strict=True))
    shards = dict(value.split("=", 1) for option, value in options if option == "--shard")
    patroni = dict(value.split("=", 1) for option, value in options if option == "--patroni")
    assert {s: _members(d) for s, d in shards.items()} == {
        "shard-1": ["shard-1:5432", "shard-1-b:5432"],
        "shard-2": ["shard-2:5432", "shard-2-b:5432"],
    }
    assert patroni == {s: f"http://{s}:8008,http://{s}-b:8008" for s in shards}
    assert dict(options)["--metadata-patroni"] == "http://meta:8008,http://meta-b:8008"
    from proxy.bootstrap import parse_patroni, parse_shards, parse_urls

    given = [value for option, value in options if option == "--patroni"]  # each once: parse_patroni says so
    parse_patroni(given, parse_shards([f"{s}={d}" for s, d in shards.items()]))
    parse_urls(dict(options)["--metadata-patroni"], "--metadata-patroni")


def test_the_docs_replicated_shard_file_adds_a_shard_like_the_first_ones(tmp_path: Path) -> None:
    """docs/resharding.md's replicated shard-3, over the replicated stack: two members like
    shard-1's, and workers like worker-1a's naming both members of shard-3 and of meta."""
    from tests.compose_check import example

    shard_file = tmp_path / "docker-compose.shard-3.yaml"
    shard_file.write_text(example(ROOT / "docs" / "resharding.md", "compose-ha-shard-3"))
    files = (ROOT / "docker-compose.yaml", ROOT / "docker-compose.ha.yaml", shard_file)
    stack = _config(_filled_env(tmp_path), *files)["services"]
    for name in ("shard-3", "shard-3-b"):
        member, model = stack[name], stack["shard-1"]
        assert member["image"] == model["image"] and member["healthcheck"] == model["healthcheck"], name
        assert set(member["environment"]) == set(model["environment"]) - {"POSTGRES_PASSWORD"}, name
        assert member["environment"]["PATRONI_SCOPE"] == "shard-3" and member["environment"]["PATRONI_NAME"] == name
    for name in ("worker-3a", "worker-3b"):
        worker, model = stack[name], stack["worker-1a"]
        assert set(worker["environment"]) == set(model["environment"]), name
        assert _members(worker["environment"]["DIALOGS_SHARD_DSN"]) == ["shard-3:5432", "shard-3-b:5432"]
        assert worker["environment"]["DIALOGS_METADATA_DSN"] == model["environment"]["DIALOGS_METADATA_DSN"]
        assert worker["healthcheck"] == model["healthcheck"] and worker["command"] == model["command"]
    volumes = {v.split(":")[0] for name in ("shard-3", "shard-3-b") for v in stack[name]["volumes"]}
    assert len(volumes) == 2 and not volumes & {v.split(":")[0] for v in stack["shard-1"]["volumes"]}


def test_nginx_waits_longer_than_a_proxy_holds_a_request(compose_ha: dict[str, Any]) -> None:
    """nginx gives a proxy more time than the proxy may hold a request through a failover or a
    cutover: a held send is answered by the service, not cut off by nginx."""
    import attrs

    from proxy.settings import ProxySettings

    nginx = (ROOT / "configs" / "nginx" / "nginx.conf").read_text()
    match = re.search(r"proxy_read_timeout (\d+)s;", nginx)
    assert match is not None
    environment = compose_ha["services"]["proxy-1"]["environment"]
    assert "DIALOGS_CUTOVER_WAIT" not in environment  # the default, then
    failover, cutover = float(environment["DIALOGS_FAILOVER_WAIT"]), attrs.fields(ProxySettings).cutover_wait.default
    assert float(match[1]) > failover + cutover, (match[1], failover, cutover)


def test_the_ha_stack_uses_the_local_clusters_patroni_settings(tmp_path: Path) -> None:
    """The Patroni settings docs/architecture.md names and measures (leader key TTL within
    Patroni's own rule, synchronous mode, pg_rewind), as dialogsctl/patroni.py runs them
    locally; configs/patroni/patroni.yml's timing, synchronous mode and recovery settings
    are the same."""
    from dialogsctl import patroni

    local = patroni.patroni_config(
        scope="s",
        name="s-0",
        etcd_url="http://127.0.0.1:2379",
        rest_port=8008,
        pg_port=5432,
        data_dir=tmp_path,
        bin_dir=tmp_path,
        pgpass=tmp_path / "pgpass",
        superuser_password="p",
        replication_password="r",
    )
    dcs = local["bootstrap"]["dcs"]
    assert dcs["loop_wait"] + 2 * dcs["retry_timeout"] <= dcs["ttl"]  # Patroni's own rule
    assert dcs["synchronous_mode"] is True and dcs["postgresql"]["use_pg_rewind"] is True
    compose = yaml.safe_load((ROOT / "configs" / "patroni" / "patroni.yml").read_text())
    assert compose["bootstrap"]["dcs"] == dcs
    assert compose["bootstrap"]["initdb"] == local["bootstrap"]["initdb"]
    assert compose["postgresql"]["basebackup"] == local["postgresql"]["basebackup"]
    users = {role: spec["username"] for role, spec in compose["postgresql"]["authentication"].items()}
    assert users == {role: spec["username"] for role, spec in local["postgresql"]["authentication"].items()}
    assert (ROOT / "configs" / "patroni" / compose["bootstrap"]["post_bootstrap"].rpartition("/")[2]).is_file()


def test_missing_secrets_are_refused(compose: dict[str, Any], tmp_path: Path) -> None:
    """Without the secrets the stack does not start with empty ones: config says what to set."""
    empty = tmp_path / "empty.env"
    empty.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "DIALOGS_", "GRAFANA_"))}
    result = subprocess.run(
        ["docker-compose", "--env-file", str(empty), "-f", "docker-compose.yaml", "config", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode != 0 and "set it in .env" in result.stderr


def test_services_and_start_order(compose: dict[str, Any]) -> None:
    """Databases, migrations, two workers per shard (each waiting for its shard), two proxies
    behind one port, Prometheus, Grafana; healthy starts."""
    services = compose["services"]
    assert set(services) == {
        "meta",
        "shard-1",
        "shard-2",
        "bootstrap",
        *WORKERS,
        "proxy-1",
        "proxy-2",
        "lb",
        "prometheus",
        "grafana",
    }
    for name in ("meta", "shard-1", "shard-2", *WORKERS, "proxy-1", "proxy-2"):
        assert "healthcheck" in services[name], name
    assert services["bootstrap"]["depends_on"]["meta"]["condition"] == "service_healthy"
    for worker in WORKERS:
        env = services[worker]["environment"]
        assert services[worker]["depends_on"]["bootstrap"]["condition"] == "service_completed_successfully"
        assert services[worker]["depends_on"][env["DIALOGS_SHARD_ID"]]["condition"] == "service_healthy"
        assert env["DIALOGS_WORKER_ID"] == worker and env["DIALOGS_ADVERTISE_URL"] == f"http://{worker}:8081"
    for proxy in ("proxy-1", "proxy-2"):
        for worker in WORKERS:
            assert services[proxy]["depends_on"][worker]["condition"] == "service_healthy"
        env = services[proxy]["environment"]
        assert env["DIALOGS_JWT_SECRET"] and env["DIALOGS_ADMIN_TOKEN"] and env["DIALOGS_HOST"] == "0.0.0.0"
        assert env["DIALOGS_INTERNAL_SECRET"] == services["worker-1a"]["environment"]["DIALOGS_INTERNAL_SECRET"]
    assert [str(p["published"]) for p in services["lb"]["ports"]] == ["8080"]
    # The image runs `python -m <command>`: every command names a module of the package.
    assert services["bootstrap"]["command"][0] == "proxy.bootstrap"
    for name in (*WORKERS, "proxy-1", "proxy-2"):
        module = services[name]["command"][0]
        assert (ROOT / module.replace(".", "/") / "__main__.py").is_file(), (name, module)
    shards = [services[w]["environment"]["DIALOGS_SHARD_ID"] for w in WORKERS]
    assert shards == ["shard-1", "shard-1", "shard-2", "shard-2"]


def test_fixed_addresses_are_outside_the_automatic_range(compose: dict[str, Any]) -> None:
    """nginx's fixed address (the one the proxies trust) can never be handed to another
    container: Docker assigns addresses only from ip_range, which leaves it out."""
    [pool] = compose["networks"]["default"]["ipam"]["config"]
    automatic = ipaddress.ip_network(pool["ip_range"])
    assert automatic.subnet_of(ipaddress.ip_network(pool["subnet"]))
    fixed = ipaddress.ip_address(compose["services"]["lb"]["networks"]["default"]["ipv4_address"])
    assert fixed in ipaddress.ip_network(pool["subnet"]) and fixed not in automatic
    assert compose["services"]["proxy-1"]["environment"]["DIALOGS_TRUSTED_PROXIES"] == str(fixed)


def test_secrets_stay_out_of_git_and_images() -> None:
    """The README's `cp .env.example .env` makes a file of secrets: git ignores it, and so does
    the image build."""
    for ignore in (".gitignore", ".dockerignore"):
        assert ".env" in (ROOT / ignore).read_text().splitlines(), ignore
    checked = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=ROOT, timeout=30)
    assert checked.returncode == 0


def test_everything_referenced_exists(compose: dict[str, Any], compose_ha: dict[str, Any]) -> None:
    """Build contexts have their Dockerfile and its COPY sources; bind mounts point at repository
    files (the replicated stack's Patroni image included)."""
    for name, service in [*compose["services"].items(), *compose_ha["services"].items()]:
        build = service.get("build")
        if build:
            context = Path(build["context"])
            dockerfile = context / build.get("dockerfile", "Dockerfile")
            assert dockerfile.is_file(), name
            for line in dockerfile.read_text().splitlines():
                if line.startswith("COPY "):
                    for source in line.split()[1:-1]:
                        assert (context / source).exists(), f"{dockerfile}: {source}"
        for volume in service.get("volumes", []):
            if isinstance(volume, dict) and volume.get("type") == "bind":
                assert Path(volume["source"]).exists(), f"{name}: {volume['source']}"
                assert str(ROOT) in volume["source"], f"{name} mounts something outside the repository"


def test_prometheus_scrapes_the_stack(compose: dict[str, Any]) -> None:
    """Prometheus discovers its targets from the stack's proxies (each on the port it listens
    on), and each proxy registers the service name Prometheus can reach it by."""
    config = yaml.safe_load((ROOT / "configs" / "prometheus" / "prometheus.yml").read_text())
    services = compose["services"]
    roles = set()
    for job in config["scrape_configs"]:
        assert "static_configs" not in job, job["job_name"]
        for sd in job["http_sd_configs"]:
            url = urllib.parse.urlsplit(sd["url"])
            assert url.path == "/discovery/prometheus", sd["url"]
            roles.add((job["job_name"], urllib.parse.parse_qs(url.query)["role"][0]))
            environment = services[url.hostname]["environment"]
            assert environment["DIALOGS_PORT"] == str(url.port), sd["url"]
            assert environment["DIALOGS_ADVERTISE_HOST"] == url.hostname, sd["url"]
    assert roles == {("dialogs-proxy", "proxy"), ("dialogs-worker", "worker"), ("patroni", "patroni")}
    for name, service in services.items():
        if "DIALOGS_ADVERTISE_URL" in service.get("environment", {}):  # workers
            assert service["environment"]["DIALOGS_ADVERTISE_URL"].startswith(f"http://{name}:"), name
    nginx = (ROOT / "configs" / "nginx" / "nginx.conf").read_text()
    assert set(re.findall(r"server (proxy-\d):8080", nginx)) == {"proxy-1", "proxy-2"}
