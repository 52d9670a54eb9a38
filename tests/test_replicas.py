"""Replicated shards: a primary lost, frozen or switched over under writers and readers.

Each shard and the metadata database is a Patroni group of a primary and one synchronous
standby, with etcd holding the leader keys (dialogsctl/patroni.py). Writers retry a failed
send with its Idempotency-Key, as clients must. After each fault: every acknowledged
message is on the group's new primary exactly once, in order, from both sides, and the
old primary has come back as a standby of the new one.
"""

from __future__ import annotations

import asyncio
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from dialogs import pg
from dialogs.metastore import maps
from dialogsctl import patroni
from dialogsctl.cluster import new_password
from dialogsctl.embedded import scratch_folder
from dialogsctl.net import free_port
from tests.support import Cluster
from tests.traffic import Traffic, check_every_dialog, make_dialogs

GROUPS = ("meta", "shard-1", "shard-2", "shard-3")  # shard-3: the one a migration adds
FAILOVER_WAIT = "35"  # seconds a proxy holds requests for a shard with no reachable primary

pytestmark = pytest.mark.slow


@dataclass
class Replicated:
    etcd: patroni.Etcd
    groups: dict[str, patroni.Group]


@pytest.fixture(scope="module")
def replicated() -> Iterator[Replicated]:
    """etcd and three groups of two members each, for the module; stopped after, also on failure."""
    base = scratch_folder("dialogs-test-ha-")
    etcd = patroni.Etcd(base / "etcd", free_port(), free_port(), base / "etcd.log")
    groups: dict[str, patroni.Group] = {}
    try:
        etcd.start()
        deadline = time.monotonic() + 200  # Group.start waits twice: for a primary, then for replication
        password, replication = new_password(), new_password()
        for name in GROUPS:
            groups[name] = patroni.Group(
                base,
                f"test-{name}",
                etcd.url,
                [(free_port(), free_port()) for _ in range(2)],
                password,
                replication,
                base,
            )
            # One group at a time, each replicated before the next starts: eight initdbs and
            # base backups at once on two cores starved Patroni's loops (a group once waited
            # 120 s for its synchronous standby under the full suite). One deadline for all,
            # well inside the first test's timeout (which counts this set-up), so a group that
            # does not replicate fails with its members' logs rather than a bare timeout.
            groups[name].start(timeout=max(5.0, deadline - time.monotonic()) / 2)
        yield Replicated(etcd, groups)
    finally:
        for group in groups.values():
            group.stop()
        etcd.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
async def ha_cluster(replicated: Replicated) -> AsyncIterator[Cluster]:
    """A fresh schema on every group, one worker per shard, one proxy that waits out failovers."""
    for group in replicated.groups.values():
        group.wait_replicated(timeout=120)  # an earlier test's fault has healed
    schema = f"t_{uuid.uuid4().hex[:12]}"
    dsns = {}
    for name, group in replicated.groups.items():
        con = await pg.connect(group.dsn("postgres"))
        try:
            await con.execute(f"CREATE SCHEMA {schema}")
        finally:
            await con.close()
        dsns[name] = f"{group.dsn('postgres')}&search_path={schema}"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        cluster = Cluster(
            metadata_dsn=dsns["meta"],
            shard_dsns={"shard-1": dsns["shard-1"], "shard-2": dsns["shard-2"]},
            session=session,
            spare_dsns={"shard-3": dsns["shard-3"]},
        )
        await cluster.bootstrap()
        con = await pg.connect(dsns["meta"])
        try:  # what `dialogs up --replicas` registers: the admin API's switchover asks these
            for shard_id in ("shard-1", "shard-2"):
                urls = [m.rest_url for m in replicated.groups[shard_id].members]
                await maps.set_patroni_urls(con, shard_id, urls)
            await maps.set_metadata_patroni_urls(con, [m.rest_url for m in replicated.groups["meta"].members])
        finally:
            await con.close()
        try:
            for shard_id in cluster.shard_dsns:
                await cluster.start_worker(shard_id)
            await cluster.start_proxy(DIALOGS_FAILOVER_WAIT=FAILOVER_WAIT)
            yield cluster
        finally:
            await cluster.stop()


@dataclass
class Outcome:
    recovered_after: float  # seconds from the fault to the first acknowledged send on the shard
    errors: dict[int, int]  # client-visible statuses other than 200 (sends and lists), by status
    slowest: float
    p99: float  # seconds: the 99th percentile of send latency on the shard, from the fault on


async def _under_traffic(
    cluster: Cluster, shard_id: str, fault: object, settle: float = 3.0, at_least: float = 0.0, keyed: bool = True
) -> tuple[Outcome, Traffic]:
    """Run 16 writers and 4 readers, apply ``fault`` (a coroutine function) mid-stream, keep
    the traffic going until the shard has acknowledged sends again for ``settle`` seconds,
    and for ``at_least`` seconds after the fault in any case. ``keyed``: writers send with
    an Idempotency-Key and retry a failure with it; otherwise without a key, never retried
    (any failure is an error the client saw)."""
    dialogs = await make_dialogs(cluster, people=24, count=32)
    traffic = Traffic([cluster.api], dialogs, retry_with_key=keyed, pause=0.05)
    stop = asyncio.Event()
    running = asyncio.ensure_future(traffic.run(stop, senders=16, readers=4))
    shard_map = await cluster.active_map()
    on_shard = {id(d) for d in dialogs if shard_map.owner(_key(d.sender, d.recipient)) == shard_id}
    assert on_shard, "no dialog on the faulted shard"
    try:
        await asyncio.sleep(2.0)  # steady state first
        loop = asyncio.get_running_loop()
        fault_at = loop.time()
        moment = await fault()  # type: ignore[operator]
        if moment is not None:  # a fault that first prepared something says when it struck
            fault_at = moment
        recovered_at = None
        deadline = fault_at + 90
        while loop.time() < deadline:
            done = [
                answered
                for started, answered, d, status in traffic.sends
                if started > fault_at and status == 200 and id(d) in on_shard
            ]
            if done:
                recovered_at = min(done)
                if loop.time() - recovered_at >= settle and loop.time() - fault_at >= at_least:
                    break
            await asyncio.sleep(0.2)
        assert recovered_at is not None, f"no send on {shard_id} succeeded within 90 s of the fault"
    finally:
        stop.set()
        await asyncio.wait_for(running, timeout=60)
    statuses: dict[int, int] = {}
    for failure in traffic.failures:  # "send 503: …" or "list 503: …": writers' and readers' alike
        status = int(failure.split()[1].rstrip(":"))
        statuses[status] = statuses.get(status, 0) + 1
    if traffic.failures:
        print("\nfailures seen by clients:", sorted({f[:160] for f in traffic.failures})[:10])
    waits = sorted(
        answered - started for started, answered, d, _ in traffic.sends if started >= fault_at and id(d) in on_shard
    )
    p99 = waits[min(len(waits) - 1, int(len(waits) * 0.99))] if waits else 0.0
    return Outcome(recovered_at - fault_at, statuses, traffic.slowest, p99), traffic


def _key(a: str, b: str) -> int:
    from dialogs.keys import dialog_key

    return dialog_key(uuid.UUID(a), uuid.UUID(b))


async def _rows_on(member: patroni.PatroniMember, schema_dsn: str) -> int:
    """Messages stored on one member (reads a standby too), in the test's schema."""
    search_path = schema_dsn.rpartition("search_path=")[2]
    con = await asyncpg.connect(member.dsn("postgres"), server_settings={"search_path": search_path})
    try:
        return int(await con.fetchval("SELECT count(*) FROM messages"))
    finally:
        await con.close()


async def _check_healed(cluster: Cluster, group: patroni.Group, traffic: Traffic, shard_id: str) -> None:
    """Every acknowledged message once, in order, from both sides; the group back to a primary
    and a streaming synchronous standby, which holds every row the primary holds."""
    total = await check_every_dialog(cluster, traffic.dialogs)
    assert total > 0 and not traffic.violations, traffic.violations
    statuses = await asyncio.to_thread(group.wait_replicated, 120)
    primary = group.primary()
    assert primary is not None, statuses
    standby = next(m for m in group.members if m is not primary)
    rows = await _rows_on(primary, cluster.dsn(shard_id))
    for _ in range(50):  # the standby replays what the primary committed
        if await _rows_on(standby, cluster.dsn(shard_id)) == rows:
            break
        await asyncio.sleep(0.1)
    assert await _rows_on(standby, cluster.dsn(shard_id)) == rows


def _report(what: str, outcome: Outcome, cluster: Cluster) -> float:
    """Print the fault's figures; return how many requests the proxy held for a failover."""
    from proxy.appkeys import METRICS

    held = cluster.proxies[0].app[METRICS].failover_wait_seconds.collect()[0].samples
    count = next((s.value for s in held if s.name.endswith("_count")), 0.0)
    waited = next((s.value for s in held if s.name.endswith("_sum")), 0.0)
    print(
        f"\n{what}: first send on the shard {outcome.recovered_after:.1f} s after the fault;"
        f" client errors {outcome.errors or 'none'}; slowest request {outcome.slowest:.1f} s;"
        f" send p99 on the shard {outcome.p99:.2f} s;"
        f" {count:.0f} requests held for the failover, {waited / max(count, 1):.1f} s on average"
    )
    return count


@pytest.mark.timeout(240)
async def test_a_primary_whose_host_is_gone_fails_over_and_comes_back_as_a_standby(
    ha_cluster: Cluster, replicated: Replicated
) -> None:
    """kill -9 of shard-1's primary PostgreSQL and its Patroni: the standby is promoted when the
    leader key expires; requests wait at the proxy meanwhile; the old primary, restarted (as
    `dialogs up` restarts a dead member), rejoins as a standby (pg_rewind)."""
    group = replicated.groups["shard-1"]
    old = group.primary()
    assert old is not None

    async def fault() -> None:
        old.kill()

    outcome, traffic = await _under_traffic(ha_cluster, "shard-1", fault)
    assert _report("kill -9 of a primary host", outcome, ha_cluster) > 0  # held, as the metric shows
    assert group.primary() is not old
    old.start()  # what the supervisor does with a member whose process died
    await _check_healed(ha_cluster, group, traffic, "shard-1")
    assert outcome.recovered_after < patroni.TTL + 10, outcome
    assert outcome.errors == {}, outcome  # held at the proxy for the failover, never failed


@pytest.mark.timeout(240)
async def test_a_planned_switchover_is_only_latency(ha_cluster: Cluster, replicated: Replicated) -> None:
    """`POST /admin/shards/shard-2/switchover` (what `dialogs shard switchover` asks): the
    shard's workers pause their writes, the primary hands over to its synchronous standby;
    writers sending without an Idempotency-Key (which nothing may retry for them) see no
    error, and the old primary streams from the new one. Then `meta`'s, after which
    registering works."""
    group = replicated.groups["shard-2"]
    old = group.primary()
    assert old is not None

    async def fault() -> None:
        done = await ha_cluster.admin("POST", "/admin/shards/shard-2/switchover")
        assert done.status == 200, done.body
        assert done.json["from"] == old.name and done.json["to"] != old.name and done.json["seconds"] < 30
        assert done.json["workers"] == done.json["workers_paused"] == 1, done.json

    outcome, traffic = await _under_traffic(ha_cluster, "shard-2", fault, keyed=False)
    _report("planned switchover", outcome, ha_cluster)
    await _check_healed(ha_cluster, group, traffic, "shard-2")
    assert outcome.errors == {}, outcome
    # What `dialogs status --url` shows of a deployment: every group, the new primary's.
    shown = await ha_cluster.admin("GET", "/admin/replication")
    assert shown.status == 200 and sorted(shown.json) == ["meta", "shard-1", "shard-2"], shown.body
    members = {m["name"]: m for m in shown.json["shard-2"]}
    new = group.primary()
    assert new is not None and members[new.name]["role"] == "primary" and members[old.name]["role"] == "sync standby"
    assert members[new.name]["timeline"] > 1, members  # the switchover began a new timeline
    # The metadata database's group, by the name `meta` (its members are registered too).
    meta = replicated.groups["meta"]
    old = meta.primary()
    done = await ha_cluster.admin("POST", "/admin/shards/meta/switchover")
    assert done.status == 200 and old is not None and done.json["from"] == old.name, done.body
    registered = await ha_cluster.api.request(
        "POST", "/user/register", body={"first_name": "After", "second_name": "Switchover", "password": "password-1"}
    )
    assert registered.status == 200, registered.body


@pytest.mark.timeout(300)
async def test_a_frozen_primary_is_replaced_and_wakes_up_as_a_standby(
    ha_cluster: Cluster, replicated: Replicated
) -> None:
    """SIGSTOP of shard-2's primary PostgreSQL and Patroni for 30 s (a frozen host): the standby
    takes over; the old primary wakes up, under traffic, believing it leads, until its
    Patroni demotes it. Meanwhile it may not serve (it fails pg.PRIMARY_CHECK) and a write
    sent to it on a connection opened before the freeze does not commit; every acknowledged
    message is on the new primary."""
    group = replicated.groups["shard-2"]
    old = group.primary()
    assert old is not None
    schema = ha_cluster.dsn("shard-2").rpartition("search_path=")[2]
    stale = await asyncpg.connect(old.dsn("postgres"), server_settings={"search_path": schema})
    await stale.execute("CREATE TABLE stale_probe (x int)")
    frozen = old.frozen()
    woke: dict[str, object] = {}

    async def wake_up_and_probe() -> None:
        await asyncio.sleep(30)
        frozen.__exit__(None, None, None)
        try:  # the old primary's first seconds awake, before its Patroni demotes it
            woke["insert"] = await asyncio.wait_for(stale.execute("INSERT INTO stale_probe VALUES (1)"), 5)
        except Exception as exc:
            woke["insert"] = exc
        try:
            fresh = await asyncpg.connect(old.dsn("postgres"), timeout=5)
            try:
                woke["may_serve"] = await fresh.fetchval(f"SELECT {pg.PRIMARY_CHECK}")
            finally:
                await fresh.close()
        except Exception as exc:  # demoted already: restarting as a standby
            woke["may_serve"] = exc

    async def fault() -> None:
        frozen.__enter__()
        waking.append(asyncio.ensure_future(wake_up_and_probe()))

    waking: list[asyncio.Future[None]] = []
    try:
        outcome, traffic = await _under_traffic(ha_cluster, "shard-2", fault, at_least=40)
        await asyncio.gather(*waking)
    finally:
        frozen.__exit__(None, None, None)
        stale.terminate()
    _report("SIGSTOP of a primary host for 30 s", outcome, ha_cluster)
    assert isinstance(woke["insert"], BaseException), woke  # never committed, never acknowledged
    assert woke["may_serve"] is not True, woke
    await _check_healed(ha_cluster, group, traffic, "shard-2")
    probe = await ha_cluster.shard_fetch("shard-2", "SELECT count(*) FROM stale_probe")
    assert probe[0][0] == 0  # what the stale primary wrote alone was rewound away
    assert outcome.recovered_after < patroni.TTL + 10, outcome
    assert outcome.errors == {}, outcome


@pytest.mark.timeout(240)
async def test_losing_the_metadata_primary_stops_nothing(ha_cluster: Cluster, replicated: Replicated) -> None:
    """kill -9 of the metadata primary's host: sends and lists go on (the map is cached), and
    registering and logging in work again once the standby is promoted."""
    group = replicated.groups["meta"]
    old = group.primary()
    assert old is not None

    async def fault() -> None:
        old.kill()

    outcome, traffic = await _under_traffic(ha_cluster, "shard-1", fault, at_least=patroni.TTL + 5)
    _report("kill -9 of the metadata primary", outcome, ha_cluster)
    assert outcome.errors == {}, outcome
    deadline = time.monotonic() + 60
    while True:
        reply = await ha_cluster.api.request(
            "POST", "/user/register", body={"first_name": "After", "second_name": "Failover", "password": "password-1"}
        )
        if reply.status == 200 or time.monotonic() > deadline:
            break
        assert reply.status == 503, reply.body
        await asyncio.sleep(0.5)
    assert reply.status == 200, reply.body
    old.start()
    await _check_healed(ha_cluster, replicated.groups["shard-1"], traffic, "shard-1")
    await asyncio.to_thread(group.wait_replicated, 120)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("side", ["source", "target"])
async def test_a_primary_failing_over_during_a_shard_add_leaves_nothing_inconsistent(
    ha_cluster: Cluster, replicated: Replicated, side: str
) -> None:
    """kill -9 of the primary host of the source (shard-1) or of the target (the new shard-3)
    while a migration copies from one to the other: the runner follows the new primary and
    finishes the migration (or aborts it cleanly); every acknowledged message is then where
    the ring says, once, in order."""
    from tests.traffic import check_placement

    group = replicated.groups["shard-1" if side == "source" else "shard-3"]
    old = group.primary()
    assert old is not None
    await ha_cluster.start_worker("shard-3")
    migration: dict[str, int] = {}

    async def fault() -> float:
        added = await ha_cluster.admin(
            "POST",
            "/admin/shards",
            {"shard_id": "shard-3", "dsn": ha_cluster.spare_dsns["shard-3"], "rows_per_second": 300, "batch_size": 100},
        )
        assert added.status == 202, added.body
        migration["id"] = added.json["migration_id"]
        await ha_cluster.wait_migration(migration["id"], phases=("copy", "catchup", "cutover"), timeout=30)
        struck = asyncio.get_running_loop().time()
        old.kill()
        return struck

    # The target's dialogs are still served by shard-1 until the cutover: writes go on
    # through the target's failover, and the cutover after it.
    outcome, traffic = await _under_traffic(
        ha_cluster, "shard-1", fault, at_least=0 if side == "source" else patroni.TTL + 5
    )
    _report(f"kill -9 of a {side} primary during a shard add", outcome, ha_cluster)
    finished = await ha_cluster.wait_migration(migration["id"], timeout=120)
    old.start()
    total = await check_every_dialog(ha_cluster, traffic.dialogs)
    shards = ["shard-1", "shard-2", "shard-3"] if finished["phase"] == "done" else ["shard-1", "shard-2"]
    if finished["phase"] == "done":
        ha_cluster.shard_dsns["shard-3"] = ha_cluster.spare_dsns["shard-3"]
    await check_placement(ha_cluster, shards, total)
    await asyncio.to_thread(group.wait_replicated, 120)
    assert outcome.errors == {}, outcome
    print(f"migration {finished['phase']}; {total} messages checked")


@pytest.mark.timeout(240)
async def test_a_standby_whose_data_is_lost_is_rebuilt_from_the_primary(
    ha_cluster: Cluster, replicated: Replicated
) -> None:
    """A standby's host and disk are lost (killed, its data directory emptied); started again
    (as `dialogs up` does), Patroni rebuilds it from the primary with no person acting."""
    group = replicated.groups["shard-1"]
    primary = group.primary()
    assert primary is not None
    standby = next(m for m in group.members if m is not primary)
    anna, token = await ha_cluster.api.user("Anna")
    boris, _ = await ha_cluster.api.peer_whose_dialog_goes_to(anna, await ha_cluster.active_map(), "shard-1")
    for i in range(20):
        assert (await ha_cluster.api.send(token, boris, f"m{i}")).status == 200
    standby.kill()
    shutil.rmtree(standby.pgdata)
    for i in range(20, 30):  # the primary goes on alone (synchronous mode is not strict)
        assert (await ha_cluster.api.send(token, boris, f"m{i}")).status == 200
    standby.start()
    await asyncio.to_thread(group.wait_replicated, 120)
    rows = await _rows_on(primary, ha_cluster.dsn("shard-1"))
    for _ in range(50):
        if await _rows_on(standby, ha_cluster.dsn("shard-1")) == rows:
            break
        await asyncio.sleep(0.1)
    assert rows > 0 and await _rows_on(standby, ha_cluster.dsn("shard-1")) == rows


@pytest.mark.timeout(120)
async def test_prometheus_finds_every_member_and_evaluates_every_replication_alert(
    ha_cluster: Cluster, replicated: Replicated, tmp_path: Path
) -> None:
    """A real Prometheus finding every member's Patroni through the proxy's discovery (the
    shards' members and the metadata database's, as registered): each alert on replication
    (without its threshold) evaluates and returns data, per group (``scope``)."""
    from tests.prometheus import Prometheus, ensure_installed
    from tests.test_observability import _COMPARISON, CONFIGS, _expressions

    await asyncio.to_thread(ensure_installed)
    registered = {m.rest_url for name in ("meta", "shard-1", "shard-2") for m in replicated.groups[name].members}
    async with ha_cluster.session.get(
        ha_cluster.proxy_urls[0] + "/discovery/prometheus", params={"role": "patroni"}
    ) as response:
        assert response.status == 200
        assert await response.json() == [
            {"targets": sorted(u.removeprefix("http://") for u in registered), "labels": {}}
        ]
    prometheus = Prometheus(
        tmp_path / "prometheus", CONFIGS / "prometheus" / "alerts.yml", discovery=ha_cluster.proxy_urls[0]
    )
    prometheus.start()
    try:
        async with aiohttp.ClientSession() as session:
            await prometheus.wait_ready(session)
            expressions = [e for e in _expressions() if "patroni_" in e]
            assert len(expressions) >= 3
            failures: list[str] = []
            for _ in range(30):  # a few scrapes first
                failures = []
                for expr in expressions:
                    expr = _COMPARISON.sub("", " ".join(expr.split()))
                    answer = await prometheus.query(session, expr)
                    scopes = {r["metric"].get("scope") for r in answer.get("data", {}).get("result", [])}
                    if answer.get("status") != "success" or not scopes >= {"test-shard-1", "test-meta"}:
                        failures.append(f"{expr} -> {answer.get('error') or scopes}")
                if not failures:
                    break
                await asyncio.sleep(1)
            assert failures == [], "\n".join(failures)
    finally:
        prometheus.stop()
