"""Resharding's edges: a target that is a shard's own database, a stalled target, a stalled
or locked metadata database at the flip, a stalled runner, a target that is gone. Under
writers and readers on two proxies: nothing acknowledged is lost, no client gets an error,
and no range stays unserved longer than the cutover's lease (2 s here)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

from dialogs.metastore import maps, migrations
from dialogsctl import postmaster
from dialogsctl.embedded import LocalPostgres
from tests.support import Cluster
from tests.test_migration_failures import Runners, _phase, _until
from tests.traffic import Traffic, check_every_dialog, check_inbox_recount, check_placement, make_dialogs

pytestmark = pytest.mark.timeout(180)

LEASE = 2.0  # DIALOGS_CUTOVER_DEADLINE in these tests
# What a request may wait at most: the lease, then the proxy's next retry (every 25 ms)
# and the time one send or read takes on this shared machine.
UNSERVED_BOUND = LEASE + 1.5


@contextlib.contextmanager
def stopped(server: LocalPostgres) -> Iterator[None]:
    """Every process of a PostgreSQL server stopped (SIGSTOP), as a hung host would be;
    continued after the block, also on failure."""
    processes = postmaster.processes_on(server.pgdata.resolve())
    assert processes, "no processes found for the server"
    for process in processes:
        process.suspend()
    try:
        yield
    finally:
        for process in processes:
            with contextlib.suppress(Exception):
                process.resume()


@contextlib.asynccontextmanager
async def writing(
    cluster: Cluster,
    driver: bool = True,
    placed: tuple[str, ...] = ("shard-1", "shard-2", "shard-3"),
) -> AsyncIterator[Traffic]:
    """shard-3 (spare) with its worker, two proxies with a 2 s cutover, and traffic on both;
    afterwards every acknowledged message is checked once, in order, where the map says
    (on the shards ``placed``)."""
    for shard_id in ("shard-1", "shard-2", "shard-3"):
        await cluster.start_worker(shard_id)
    env = {"DIALOGS_CUTOVER_DEADLINE": str(LEASE), "DIALOGS_MIGRATION_DRIVER": "true" if driver else "false"}
    await cluster.start_proxy(**env)
    await cluster.start_proxy(**env)
    traffic = Traffic([cluster.api_for(0), cluster.api_for(1)], await make_dialogs(cluster))
    stop = asyncio.Event()
    load = asyncio.ensure_future(traffic.run(stop))
    try:
        await asyncio.sleep(1.0)
        yield traffic
    finally:
        stop.set()
        await load
    assert traffic.failures == []
    assert traffic.violations == []
    total = await check_every_dialog(cluster, traffic.dialogs)
    await check_placement(cluster, list(placed), total)
    print(f"{total} acknowledged messages each once, in order; the slowest request waited {traffic.slowest:.2f} s")


async def _add_shard_3(cluster: Cluster, **throttle: int) -> int:
    started = await cluster.admin(
        "POST",
        "/admin/shards",
        {
            "shard_id": "shard-3",
            "dsn": cluster.spare_dsns["shard-3"],
            **throttle,
        },
    )
    assert started.status == 202, started.body
    return int(started.json["migration_id"])


async def _prepared(cluster: Cluster, migration_id: int) -> None:
    """Until the targets have their 'incoming' ranges (prepare is over)."""

    async def done() -> bool:
        return (await _phase(cluster, migration_id))["phase"] != "prepare"

    await _until(done, timeout=60)


async def _waiting_on_lock(dsn: str, query_like: str) -> bool:
    con = await asyncpg.connect(dsn)
    try:
        return (
            await con.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE $1", query_like
            )
            > 0
        )
    finally:
        await con.close()


@contextlib.asynccontextmanager
async def holding(dsn: str, sql: str, *args: object) -> AsyncIterator[asyncpg.Connection]:
    """A transaction that has run ``sql`` (a lock), rolled back after the block."""
    con = await asyncpg.connect(dsn)
    transaction = con.transaction()
    await transaction.start()
    try:
        await con.execute(sql, *args)
        yield con
    finally:
        with contextlib.suppress(Exception):
            await transaction.rollback()
        await con.close()


# --- a target that is already a shard's database ---------------------------------------


async def test_a_shards_own_database_is_refused_as_a_new_shard(cluster: Cluster) -> None:
    """The DSN of shard-2, as written or by another name for the same server, a database that
    serves ranges, and one that holds messages: each is refused (409, nothing registered),
    and every message stays where it was."""
    api = cluster.api
    anna, token = await api.user("Anna")
    peers = [await api.register(f"Peer{i}") for i in range(10)]
    for peer in peers:
        assert (await api.send(token, peer, "hello")).status == 200
    shard_2 = cluster.shard_dsns["shard-2"]
    alias = shard_2.replace("127.0.0.1", "localhost")
    assert alias != shard_2
    for dsn in (shard_2, alias):
        refused = await cluster.admin("POST", "/admin/shards", {"shard_id": "shard-x", "dsn": dsn})
        assert refused.status == 409, refused.body
        assert "it is the database of shard shard-2" in refused.json["message"]
        password = urllib.parse.urlsplit(dsn).password
        assert password and password not in refused.json["message"] and "***" in refused.json["message"]
    spare = cluster.spare_dsns["shard-3"]
    await cluster.shard_fetch("shard-3", "CREATE TABLE shard_ranges (lo bigint, hi bigint, state text)")
    await cluster.shard_fetch("shard-3", "INSERT INTO shard_ranges VALUES (0, 10, 'owned')")
    refused = await cluster.admin("POST", "/admin/shards", {"shard_id": "shard-x", "dsn": spare})
    assert refused.status == 409 and "already has shard ranges (1 owned)" in refused.json["message"], refused.body
    await cluster.shard_fetch("shard-3", "DROP TABLE shard_ranges")
    await cluster.shard_fetch("shard-3", "CREATE TABLE messages (id bigint)")
    await cluster.shard_fetch("shard-3", "INSERT INTO messages VALUES (1)")
    refused = await cluster.admin("POST", "/admin/shards", {"shard_id": "shard-x", "dsn": spare})
    assert refused.status == 409 and "already holds messages" in refused.json["message"], refused.body

    assert [s["shard_id"] for s in (await cluster.admin("GET", "/admin/shards")).json] == ["shard-1", "shard-2"]
    assert (await cluster.admin("GET", "/admin/migrations")).json == []
    for peer in peers:
        assert [m["text"] for m in (await api.list(token, peer)).json] == ["hello"]


async def test_the_runner_refuses_a_shards_database_even_past_the_admin_api(cluster: Cluster) -> None:
    """A migration recorded without the admin API's check (a DSN changed under a registered
    shard, a script): the runner checks again before it touches the target, aborts, and
    shard-2 keeps every row and every range."""
    api = cluster.api
    anna, token = await api.user("Anna")
    peers = [await api.register(f"Peer{i}") for i in range(30)]
    for peer in peers:
        assert (await api.send(token, peer, "hello")).status == 200
    ranges = "SELECT lo, hi, state FROM shard_ranges ORDER BY lo"
    messages = "SELECT dialog_key, id, text FROM messages ORDER BY dialog_key, id"
    before = (await cluster.shard_fetch("shard-2", ranges), await cluster.shard_fetch("shard-2", messages))
    con = await asyncpg.connect(cluster.metadata_dsn)
    try:
        await maps.register_shard(con, "shard-x", cluster.shard_dsns["shard-2"])
        current = await maps.active_map(con)
        assert current is not None
        migration = await migrations.create(con, "add", "shard-x", current.with_shard("shard-x", 1), current, 0, 5000)
    finally:
        await con.close()
    result = await cluster.wait_migration(migration.migration_id)
    assert result["phase"] == "aborted", result
    assert "shard-x cannot be a new shard: it is the database of shard shard-2" in result["error"]
    after = (await cluster.shard_fetch("shard-2", ranges), await cluster.shard_fetch("shard-2", messages))
    assert after == before
    for peer in peers:
        assert [m["text"] for m in (await api.list(token, peer)).json] == ["hello"]


# --- stalls and losses during the cutover ------------------------------------------------


async def test_a_target_stopped_in_the_cutover_does_not_hold_the_sources(
    bare_cluster: Cluster,
    running_servers: dict[str, LocalPostgres],
) -> None:
    """The target's server stops (SIGSTOP) while the runner waits on it in the cutover: the
    sources serve the ranges again within the lease, not when the target wakes (8 s later);
    the migration then completes."""
    cluster = bare_cluster
    async with writing(cluster) as traffic:
        migration_id = await _add_shard_3(cluster, rows_per_second=400, batch_size=100)
        await _prepared(cluster, migration_id)
        # Hold the target's incoming ranges, so that the hand-over waits on the target...
        async with holding(
            cluster.spare_dsns["shard-3"], "SELECT 1 FROM shard_ranges WHERE state = 'incoming' FOR UPDATE"
        ) as blocker:
            await _until(lambda: _waiting_on_lock(cluster.spare_dsns["shard-3"], "%set_range_states%"), timeout=60)
            # ...then stop the whole server there.
            with stopped(running_servers["shard-3"]):
                await asyncio.sleep(8)
            await blocker.execute("SELECT 1")
        done = await cluster.wait_migration(migration_id, timeout=90)
        assert done["phase"] == "done", done
        assert done["cutover_attempts"] >= 1
    assert traffic.slowest < UNSERVED_BOUND, f"a request waited {traffic.slowest:.1f} s"


@contextlib.asynccontextmanager
async def at_the_flip(cluster: Cluster, migration_id: int) -> AsyncIterator[None]:
    """The block runs while the runner's flip waits for the migration's row, which this holds
    (released after the block). To get there in time: the hand-over is held on the target
    until this has taken the row, then let go."""
    await _prepared(cluster, migration_id)
    meta = await asyncpg.connect(cluster.metadata_dsn)
    row = meta.transaction()
    try:
        async with holding(
            cluster.spare_dsns["shard-3"], "SELECT 1 FROM shard_ranges WHERE state = 'incoming' FOR UPDATE"
        ):
            await _until(lambda: _waiting_on_lock(cluster.spare_dsns["shard-3"], "%set_range_states%"), timeout=60)
            await row.start()
            await meta.execute("SELECT 1 FROM migrations WHERE migration_id = $1 FOR UPDATE", migration_id)
        await _until(lambda: _waiting_on_lock(cluster.metadata_dsn, "%FROM migrations%FOR UPDATE%"), timeout=10)
        yield
    finally:
        with contextlib.suppress(Exception):
            await row.rollback()
        await meta.close()


async def test_a_locked_migration_row_at_the_flip_gives_the_ranges_back(
    bare_cluster: Cluster,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Someone holds the migration's row for 6 s just as the runner flips: the flip gives up
    within the lease with nothing written, the sources serve again, a later attempt completes,
    and the recorded pause is the one clients saw."""
    cluster = bare_cluster
    async with writing(cluster) as traffic:
        migration_id = await _add_shard_3(cluster, rows_per_second=400, batch_size=100)
        async with at_the_flip(cluster, migration_id):
            await asyncio.sleep(6)
        done = await cluster.wait_migration(migration_id, timeout=90)
        assert done["phase"] == "done", done
        assert done["cutover_attempts"] >= 1, done
    assert "could not activate the new map: canceling statement due to statement timeout" in caplog.text
    assert traffic.slowest < UNSERVED_BOUND, f"a request waited {traffic.slowest:.1f} s"
    assert done["last_pause_ms"] < LEASE * 1000


async def test_a_metadata_server_stopped_at_the_flip_leaves_nothing_unserved(
    bare_cluster: Cluster,
    running_servers: dict[str, LocalPostgres],
) -> None:
    """The metadata server stops (SIGSTOP, 8 s) while the flip waits for it: the sources'
    leases end on their own clocks and they serve again; once it is back, the migration is
    redone and every message is there once."""
    cluster = bare_cluster
    async with writing(cluster) as traffic:
        migration_id = await _add_shard_3(cluster, rows_per_second=400, batch_size=100)
        async with at_the_flip(cluster, migration_id):
            with stopped(running_servers["meta"]):
                await asyncio.sleep(8)
        done = await cluster.wait_migration(migration_id, timeout=120)
        assert done["phase"] == "done", done
    assert traffic.slowest < UNSERVED_BOUND, f"a request waited {traffic.slowest:.1f} s"


@contextlib.asynccontextmanager
async def without_its_standby(dsn: str) -> AsyncIterator[None]:
    """The server names a synchronous standby that never comes, as a primary whose standby
    froze or was cut off: a synchronous commit waits until the block ends (the name is
    removed, which releases it), also on failure."""
    con = await asyncpg.connect(dsn)
    try:
        await con.execute("ALTER SYSTEM SET synchronous_standby_names = 'frozen_standby'")
        await con.execute("SELECT pg_reload_conf()")
        yield
    finally:
        await con.execute("ALTER SYSTEM RESET synchronous_standby_names")
        await con.execute("SELECT pg_reload_conf()")
        await con.close()


async def _waiting_for_standby(dsn: str) -> bool:
    con = await asyncpg.connect(dsn)
    try:
        return bool(await con.fetchval("SELECT count(*) > 0 FROM pg_stat_activity WHERE wait_event = 'SyncRep'"))
    finally:
        await con.close()


async def _messages_on(dsns: list[str]) -> int:
    total = 0
    for dsn in dsns:
        con = await asyncpg.connect(dsn)
        try:
            total += await con.fetchval("SELECT count(*) FROM messages")
        finally:
            await con.close()
    return total


async def test_a_flip_the_metadata_standby_lacks_moves_nothing_on(
    bare_cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """The flip commits on the metadata primary alone (as when its wait for a frozen standby
    is cut short by the flip's bound): the runner deletes nothing on the sources until the
    standby has it, since a metadata failover before then would forget the flip. Once the
    standby is back, the migration completes with every message once, in order."""
    cluster = bare_cluster
    sources = [cluster.shard_dsns["shard-1"], cluster.shard_dsns["shard-2"]]
    async with writing(cluster) as traffic:
        migration_id = await _add_shard_3(cluster, rows_per_second=400, batch_size=100)
        async with without_its_standby(cluster.metadata_dsn):
            # Until now nothing on the metadata database waited for a standby (the suite's
            # servers commit asynchronously): the flip commits alone, then the runner waits.
            await _until(lambda: _waiting_for_standby(cluster.metadata_dsn), timeout=90)
            assert (await _phase(cluster, migration_id))["phase"] == "cleanup"
            kept = await _messages_on(sources)
            await asyncio.sleep(3)
            assert await _messages_on(sources) >= kept, "a source deleted moved rows before the flip was safe"
            assert (await _phase(cluster, migration_id))["phase"] == "cleanup"
        done = await cluster.wait_migration(migration_id, timeout=60)
        assert done["phase"] == "done", done
    assert traffic.slowest < UNSERVED_BOUND, f"a request waited {traffic.slowest:.1f} s"


async def test_a_runner_stopped_mid_cutover_leaves_nothing_frozen(bare_cluster: Cluster) -> None:
    """`dialogs run-migration` stopped (SIGSTOP, 8 s) while its hand-over waits: the sources'
    leases end and they serve again without it; continued, it finds the lease gone, gives
    the ranges back and completes on a later attempt."""
    cluster = bare_cluster
    runners = Runners(cluster.metadata_dsn)
    runners.env["DIALOGS_CUTOVER_DEADLINE"] = str(LEASE)
    try:
        async with writing(cluster, driver=False) as traffic:
            migration_id = await _add_shard_3(cluster, rows_per_second=400, batch_size=100)
            runner = runners.start()
            await _prepared(cluster, migration_id)
            async with holding(
                cluster.spare_dsns["shard-3"], "SELECT 1 FROM shard_ranges WHERE state = 'incoming' FOR UPDATE"
            ) as blocker:
                await _until(lambda: _waiting_on_lock(cluster.spare_dsns["shard-3"], "%set_range_states%"), timeout=60)
                runner.send_signal(signal.SIGSTOP)
                await blocker.execute("SELECT 1")
            try:
                await asyncio.sleep(8)
            finally:
                runner.send_signal(signal.SIGCONT)
            done = await cluster.wait_migration(migration_id, timeout=90)
            assert done["phase"] == "done", done
            assert done["cutover_attempts"] >= 1
    finally:
        runners.cleanup()
    assert traffic.slowest < UNSERVED_BOUND, f"a request waited {traffic.slowest:.1f} s"


async def test_a_target_gone_in_catchup_can_be_aborted(
    bare_cluster: Cluster,
    running_servers: dict[str, LocalPostgres],
) -> None:
    """The target's server is gone during catch-up: an abort completes without it, the sources
    own their ranges again with an empty delta log, and the same database is refused as a
    new shard later (it still holds the copies) instead of being silently reused."""
    cluster = bare_cluster
    async with writing(cluster, placed=("shard-1", "shard-2")) as traffic:
        await cluster.workers.pop(next(name for name in cluster.workers if name.startswith("shard-3"))).cleanup()
        migration_id = await _add_shard_3(cluster)

        async def catching_up() -> bool:
            return (await _phase(cluster, migration_id))["phase"] == "catchup"

        await _until(catching_up, timeout=60)
        running_servers["shard-3"].stop()
        await asyncio.sleep(2)  # the runner fails on the target a few times
        aborted = await cluster.admin("POST", f"/admin/migrations/{migration_id}/abort")
        assert aborted.status == 202, aborted.body
        result = await cluster.wait_migration(migration_id, timeout=30)
        assert result["phase"] == "aborted", result
    assert traffic.slowest < UNSERVED_BOUND, f"a request waited {traffic.slowest:.1f} s"
    for shard_id in ("shard-1", "shard-2"):
        states = await cluster.shard_fetch(shard_id, "SELECT DISTINCT state FROM shard_ranges")
        assert [row["state"] for row in states] == ["owned"]
        assert (await cluster.shard_fetch(shard_id, "SELECT count(*) FROM migration_delta"))[0][0] == 0
    running_servers["shard-3"].start()
    again = await cluster.admin("POST", "/admin/shards", {"shard_id": "shard-3", "dsn": cluster.spare_dsns["shard-3"]})
    assert again.status == 409 and "incoming" in again.json["message"], again.body


async def test_writes_a_source_takes_after_the_flip_reach_the_new_owner(
    bare_cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The window the lease leaves open: the flip committed, but the sources were not released
    before their lease ran out (runner and metadata server stopped right after the flip). A
    write a source takes then (from a worker that has not seen the new map yet) is in its
    delta log, and cleanup copies it to the new owner before it deletes anything. A read
    mark each side took meanwhile (one on the source, one on the new owner) both stand: the
    dialog's states are merged, not ordered by version, and the inboxes follow."""
    from proxy.migration import runner as runner_module
    from proxy.migration.runner import RunnerSettings, run_active

    cluster = bare_cluster
    for shard_id in ("shard-1", "shard-2", "shard-3"):
        await cluster.start_worker(shard_id)
    await cluster.start_proxy(DIALOGS_MIGRATION_DRIVER="false")
    api = cluster.api
    anna, token = await api.user("Anna")
    old_map = await cluster.active_map()
    new_map = old_map.with_shard("shard-3")
    peer, key = await api.peer_whose_dialog_goes_to(anna, new_map, "shard-3")  # its dialog with Anna moves
    source = old_map.owner(key)
    before = (await api.send(token, peer, "before")).json["id"]
    lo, hi = sorted((uuid.UUID(anna), uuid.UUID(peer)))
    anna_is_lo = lo == uuid.UUID(anna)
    late: list[str] = []
    release = runner_module._Run._release_sources
    writer: list[asyncio.Future[None]] = []

    async def too_late(self: runner_module._Run) -> None:
        # The first call (right after the flip) starts the late writes and does not release;
        # the runner's deadline on that step may cancel the wait, never the writes (shielded).
        # The next call (cleanup) waits for them, then releases.
        if writer:
            await writer[0]
            return await release(self)
        writer.append(asyncio.ensure_future(write_late()))
        await asyncio.shield(writer[0])
        return None

    async def write_late() -> None:
        # The flip has committed; wait out the source's lease, then a stale worker writes there.
        while (await cluster.shard_fetch(source, "SELECT bool_or(lease_until > clock_timestamp()) FROM shard_ranges"))[
            0
        ][0]:
            await asyncio.sleep(0.05)
        stored = await cluster.shard_fetch(
            source,
            "SELECT status FROM store_messages($1, $2, $3, $4, $5, $6)",
            [key],
            [lo],
            [hi],
            [True],
            ["after the flip"],
            [None],
        )
        late.append(stored[0]["status"])
        # The new owner took Anna's mark (up to its newest: "before"), the source the peer's
        # (up to its newest: the late message), each bumping the state's version.
        for shard_id, reader_lo in (("shard-3", anna_is_lo), (source, not anna_is_lo)):
            marked = await cluster.shard_fetch(
                shard_id, "SELECT status FROM mark_read($1, $2, $3, $4, NULL)", key, lo, hi, reader_lo
            )
            late.append(marked[0]["status"])

    monkeypatch.setattr(runner_module._Run, "_release_sources", too_late)
    started = await cluster.admin(
        "POST", "/admin/shards", {"shard_id": "shard-3", "dsn": cluster.spare_dsns["shard-3"]}
    )
    result = await run_active(cluster.metadata_dsn, RunnerSettings(cutover_deadline=LEASE, liveness_ttl=3))
    assert result is not None and result.phase == "done", result
    assert result.migration_id == started.json["migration_id"]
    assert late == ["inserted", "marked", "marked"]  # the source took it: its lease had run out
    listed = await api.whole_dialog(token, peer)
    assert [m["text"] for m in listed] == ["after the flip", "before"], listed
    late_id, late_from_anna = listed[0]["id"], anna_is_lo  # sent as user_lo
    state = (
        await cluster.shard_fetch("shard-3", "SELECT read_lo, read_hi FROM dialog_state WHERE dialog_key = $1", key)
    )[0]
    marks = {
        anna: state["read_lo"] if anna_is_lo else state["read_hi"],
        peer: state["read_hi"] if anna_is_lo else state["read_lo"],
    }
    assert marks == {anna: int(before), peer: int(late_id)}, marks  # both stand (asking below sets no mark)
    assert (await api.read(token, peer, before)).json == {"up_to": before, "unread": 0 if late_from_anna else 1}
    peer_token = await api.login(peer)
    assert (await api.read(peer_token, anna, before)).json == {"up_to": late_id, "unread": 0}
    await check_inbox_recount(cluster)
    assert (await cluster.shard_fetch(source, "SELECT count(*) FROM messages WHERE dialog_key = $1", key))[0][0] == 0
