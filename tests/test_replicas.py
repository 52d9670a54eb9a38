"""Replicated shards: a primary lost, frozen or switched over under writers and readers.

Each shard and the metadata database is a Patroni group of a primary and one synchronous
standby, with etcd holding the leader keys (dialogsctl/patroni.py). Writers retry a failed
send with its Idempotency-Key, as clients must. After each fault: every acknowledged
message is on the group's new primary exactly once, in order, from both sides, and the
old primary has come back as a standby of the new one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
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
from tests.support import Api, Cluster
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

        def replicated_in_time(group: patroni.Group) -> None:
            # One deadline for all, well inside the first test's timeout (which counts this
            # set-up), so a group that does not replicate fails with its members' logs rather
            # than a bare timeout. (What Group.start waits for.)
            patroni.wait_for_primary(group.members, max(5.0, deadline - time.monotonic()) / 2)
            group.wait_replicated(max(5.0, deadline - time.monotonic()))

        # Two groups at a time, the next one started as soon as one of them is replicated:
        # eight initdbs and base backups at once on two cores starved Patroni's loops (a group
        # once waited 120 s for its synchronous standby under the full suite), while a group
        # alone leaves the cores mostly idle (it waits on Patroni's loops): one at a time took
        # 34 s, two 17 s. Only the waiting is done in other threads: a member started there
        # would get its parent-death signal (embedded.die_with_parent) when that thread ends.
        queue = list(groups.values())
        waiting: set[concurrent.futures.Future[None]] = set()
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            while queue or waiting:
                while queue and len(waiting) < 2:
                    group = queue.pop(0)
                    for member in group.members:
                        member.start()
                    waiting.add(pool.submit(replicated_in_time, group))
                done, waiting = concurrent.futures.wait(waiting, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in done:
                    future.result()
        yield Replicated(etcd, groups)
    finally:
        # Every group at once (each stops its standby, then its primary): some 7 s a group,
        # nearly all of it waiting on Patroni; etcd after them all, which their stops still use.
        with concurrent.futures.ThreadPoolExecutor(max(1, len(groups))) as pool:
            stopping = [pool.submit(group.stop) for group in groups.values()]
        try:
            for stopped in stopping:
                stopped.result()
        finally:
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


@dataclass
class Fault:
    """What to do to one shard's group under traffic."""

    shard_id: str
    strike: Callable[[], Awaitable[float | None]]  # returns when it struck, if not when called
    at_least: float = 0.0  # seconds the traffic goes on after the fault in any case
    # A proxy of this fault's own: the dialogs on its shard get a traffic of their own through
    # it alone, so that its metrics (requests held for a failover) are this fault's only.
    api: Api | None = None
    # Set once the shard has acknowledged sends again for ``settle`` seconds after the fault.
    settled: asyncio.Event = field(default_factory=asyncio.Event)


async def _under_traffic(
    cluster: Cluster,
    shard_id: str,
    fault: Callable[[], Awaitable[float | None]],
    settle: float = 3.0,
    at_least: float = 0.0,
    keyed: bool = True,
) -> tuple[Outcome, Traffic]:
    """Run 16 writers and 4 readers over dialogs on every shard, through the first proxy,
    apply ``fault`` (a coroutine function) mid-stream, keep the traffic going until the shard
    has acknowledged sends again for ``settle`` seconds, and for ``at_least`` seconds after
    the fault in any case. ``keyed``: writers send with an Idempotency-Key and retry a
    failure with it; otherwise without a key, never retried (any failure is an error the
    client saw)."""
    outcomes, traffics = await _under_faults(cluster, [Fault(shard_id, fault, at_least)], settle=settle, keyed=keyed)
    return outcomes[shard_id], traffics[shard_id]


async def _under_faults(
    cluster: Cluster, faults: list[Fault], settle: float = 3.0, keyed: bool = True
) -> tuple[dict[str, Outcome], dict[str, Traffic]]:
    """``_under_traffic`` for several faults at once, each on a shard of its own, all applied
    at the same moment: the traffic goes on until every one of them is over (settled, and
    ``at_least`` after it). Faults with an ``api`` each get a traffic of their own (the
    dialogs on their shard, through that proxy; the writers and readers shared out), and
    then every shard with dialogs must have one. Each shard's outcome, and the traffic its
    dialogs were in."""
    assert len({f.shard_id for f in faults}) == len(faults), "one fault a shard"
    dialogs = await make_dialogs(cluster, people=24, count=32)
    shard_map = await cluster.active_map()
    owner = {id(d): shard_map.owner(_key(d.sender, d.recipient)) for d in dialogs}
    traffics: dict[str, Traffic] = {}
    if any(f.api is not None for f in faults):
        assert all(f.api is not None for f in faults), "a proxy for every fault, or for none"
        assert set(owner.values()) <= {f.shard_id for f in faults}, "a dialog on a shard no traffic covers"
        for f in faults:
            assert f.api is not None
            traffics[f.shard_id] = Traffic(
                [f.api], [d for d in dialogs if owner[id(d)] == f.shard_id], retry_with_key=keyed, pause=0.05
            )
    else:
        whole = Traffic([cluster.api], dialogs, retry_with_key=keyed, pause=0.05)
        traffics = dict.fromkeys((f.shard_id for f in faults), whole)
    for f in faults:
        assert any(owner[id(d)] == f.shard_id for d in traffics[f.shard_id].dialogs), (
            f"no dialog on the faulted shard {f.shard_id}"
        )
    distinct = list({id(t): t for t in traffics.values()}.values())
    stop = asyncio.Event()
    running = asyncio.gather(*(t.run(stop, senders=16 // len(distinct), readers=4 // len(distinct)) for t in distinct))
    try:
        await asyncio.sleep(2.0)  # steady state first
        loop = asyncio.get_running_loop()
        now = loop.time()
        moments = await asyncio.gather(*(f.strike() for f in faults))
        # A fault that first prepared something says when it struck.
        fault_at = {f.shard_id: now if moment is None else moment for f, moment in zip(faults, moments, strict=True)}
        recovered_at: dict[str, float] = {}
        deadline = max(fault_at.values()) + 90
        while loop.time() < deadline:
            for f in faults:
                traffic = traffics[f.shard_id]
                done = [
                    answered
                    for started, answered, d, status in traffic.sends
                    if started > fault_at[f.shard_id] and status == 200 and owner[id(d)] == f.shard_id
                ]
                if done:
                    recovered_at[f.shard_id] = min(done)
                    if loop.time() - recovered_at[f.shard_id] >= settle:
                        f.settled.set()
            if all(f.settled.is_set() and loop.time() - fault_at[f.shard_id] >= f.at_least for f in faults):
                break
            await asyncio.sleep(0.2)
        for f in faults:
            assert f.shard_id in recovered_at, f"no send on {f.shard_id} succeeded within 90 s of the fault"
    finally:
        stop.set()
        await asyncio.wait_for(running, timeout=60)
    outcomes = {}
    for f in faults:
        traffic = traffics[f.shard_id]
        statuses: dict[int, int] = {}
        for failure in traffic.failures:  # "send 503: …" or "list 503: …": writers' and readers' alike
            status = int(failure.split()[1].rstrip(":"))
            statuses[status] = statuses.get(status, 0) + 1
        if traffic.failures:
            print(
                f"\nfailures seen by clients ({f.shard_id}'s traffic):",
                sorted({x[:160] for x in traffic.failures})[:10],
            )
        waits = sorted(
            answered - started
            for started, answered, d, _ in traffic.sends
            if started >= fault_at[f.shard_id] and owner[id(d)] == f.shard_id
        )
        p99 = waits[min(len(waits) - 1, int(len(waits) * 0.99))] if waits else 0.0
        outcomes[f.shard_id] = Outcome(recovered_at[f.shard_id] - fault_at[f.shard_id], statuses, traffic.slowest, p99)
    return outcomes, traffics


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


def _report(what: str, outcome: Outcome, cluster: Cluster, proxy: int = 0) -> float:
    """Print the fault's figures; return how many requests the proxy held for a failover."""
    from proxy.appkeys import METRICS

    held = cluster.proxies[proxy].app[METRICS].failover_wait_seconds.collect()[0].samples
    count = next((s.value for s in held if s.name.endswith("_count")), 0.0)
    waited = next((s.value for s in held if s.name.endswith("_sum")), 0.0)
    print(
        f"\n{what}: first send on the shard {outcome.recovered_after:.1f} s after the fault;"
        f" client errors {outcome.errors or 'none'}; slowest request {outcome.slowest:.1f} s;"
        f" send p99 on the shard {outcome.p99:.2f} s;"
        f" {count:.0f} requests held for the failover, {waited / max(count, 1):.1f} s on average"
    )
    return count


@pytest.mark.timeout(360)
async def test_a_primary_whose_host_is_gone_and_one_that_froze_fail_over_and_come_back_as_standbys(
    ha_cluster: Cluster, replicated: Replicated
) -> None:
    """Two primaries lost at once, one per shard, each shard's traffic through a proxy of its
    own (so that each proxy's count of requests held for a failover is its own fault's).

    kill -9 of shard-1's primary PostgreSQL and its Patroni: the standby is promoted when the
    leader key expires; requests wait at the proxy meanwhile; the old primary, restarted (as
    `dialogs up` restarts a dead member) once the shard serves again, rejoins as a standby
    (pg_rewind).

    SIGSTOP of shard-2's primary PostgreSQL and Patroni for 30 s (a frozen host): the standby
    takes over; the old primary wakes up, under traffic, believing it leads, until its
    Patroni demotes it. Meanwhile it may not serve (it fails pg.PRIMARY_CHECK) and a write
    sent to it on a connection opened before the freeze does not commit; every acknowledged
    message is on the new primary."""
    killed_group, frozen_group = replicated.groups["shard-1"], replicated.groups["shard-2"]
    killed, old = killed_group.primary(), frozen_group.primary()
    assert killed is not None and old is not None
    await ha_cluster.start_proxy(DIALOGS_FAILOVER_WAIT=FAILOVER_WAIT)  # proxies[1]: shard-2's traffic
    schema = ha_cluster.dsn("shard-2").rpartition("search_path=")[2]
    stale = await asyncpg.connect(old.dsn("postgres"), server_settings={"search_path": schema})
    await stale.execute("CREATE TABLE stale_probe (x int)")
    frozen = old.frozen()
    woke: dict[str, object] = {}
    background: list[asyncio.Future[None]] = []
    struck: set[str] = set()

    async def kill() -> None:
        struck.add("kill")
        killed.kill()
        background.append(asyncio.ensure_future(restart_once_replaced()))

    async def restart_once_replaced() -> None:
        await lost.settled.wait()
        assert await asyncio.to_thread(killed_group.primary) is not killed
        killed.start()  # what the supervisor does with a member whose process died

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

    async def freeze() -> None:
        struck.add("freeze")
        frozen.__enter__()
        background.append(asyncio.ensure_future(wake_up_and_probe()))

    lost = Fault("shard-1", kill, api=ha_cluster.api_for(0))
    froze = Fault("shard-2", freeze, at_least=40, api=ha_cluster.api_for(1))
    try:
        outcomes, traffics = await _under_faults(ha_cluster, [lost, froze])
        await asyncio.gather(*background)
    finally:
        if "freeze" in struck:  # (exiting a freeze never entered would freeze the member)
            frozen.__exit__(None, None, None)
        stale.terminate()
        for task in background:
            task.cancel()
        if "kill" in struck and not killed.running:  # failed before the restart: later tests need it
            killed.start()
    # Held, as the metric shows: proxies[0]'s, which only shard-1's traffic went through.
    assert _report("kill -9 of a primary host", outcomes["shard-1"], ha_cluster, proxy=0) > 0
    _report("SIGSTOP of a primary host for 30 s", outcomes["shard-2"], ha_cluster, proxy=1)
    assert isinstance(woke["insert"], BaseException), woke  # never committed, never acknowledged
    assert woke["may_serve"] is not True, woke
    await asyncio.gather(
        _check_healed(ha_cluster, killed_group, traffics["shard-1"], "shard-1"),
        _check_healed(ha_cluster, frozen_group, traffics["shard-2"], "shard-2"),
    )
    probe = await ha_cluster.shard_fetch("shard-2", "SELECT count(*) FROM stale_probe")
    assert probe[0][0] == 0  # what the stale primary wrote alone was rewound away
    for outcome in outcomes.values():
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
