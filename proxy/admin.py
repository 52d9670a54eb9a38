"""The admin API: shards, the shard map, migrations. Authenticated with the admin token."""

from __future__ import annotations

import asyncio
import hmac
import re
from typing import Any

from aiohttp import web

from dialogs import checks, errors, pg, shard_map
from dialogs.http import bearer_token, json_response, read_json
from dialogs.keys import INT64_MAX
from dialogs.metastore import maps, migrations
from dialogs.metastore.store import MetadataStore
from dialogs.migration_plan import Holdings, target_problem
from dialogs.pg import dsn_problem
from proxy import inbox_verify
from proxy.appkeys import METADATA, SETTINGS, TOKENS, TOPOLOGY
from proxy.migration import shard_sql
from proxy.switchover import group_members
from proxy.switchover import switchover as switchover_of

_PASSWORD = re.compile(r"(://[^:/@]*:)[^@]*@")
MAX_ROWS_PER_SECOND = 10_000_000
CONNECT_TIMEOUT = 3.0  # seconds to reach a shard's database from the admin API
_UNREACHABLE: tuple[type[BaseException], ...] = (*pg.FAILURES, ValueError)  # ValueError: a DSN asyncpg cannot parse


_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&]*")


def redact(dsn: str) -> str:
    """The DSN with its password, in the user part or the query, as ***."""
    return _QUERY_PASSWORD.sub(r"\1***", _PASSWORD.sub(r"\1***@", dsn))


def _require_admin(request: web.Request) -> None:
    expected = request.app[SETTINGS].admin_token
    if not expected:
        raise errors.Forbidden("the admin API is disabled (DIALOGS_ADMIN_TOKEN is not set)")
    token = bearer_token(request, missing="missing admin token")
    if hmac.compare_digest(token.encode(), expected.encode()):
        return
    try:
        request.app[TOKENS].verify(token)
    except errors.Unauthorized:
        raise errors.Unauthorized("invalid admin token") from None
    raise errors.Forbidden("a user token cannot use the admin API")


def _int(data: dict[str, Any], name: str, default: int | None, low: int, high: int) -> int | None:
    value = data.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise errors.InvalidInput(f"{name} must be an integer from {low} to {high}")
    return value


def _throttle(data: dict[str, Any], defaults: bool = True) -> tuple[int | None, int | None]:
    return (
        _int(data, "rows_per_second", 0 if defaults else None, 0, MAX_ROWS_PER_SECOND),
        _int(data, "batch_size", 5000 if defaults else None, 100, 100_000),
    )


async def _body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    body = await read_json(request)
    if not isinstance(body, dict):
        raise errors.InvalidInput("request body must be a JSON object")
    return body


def _store(request: web.Request) -> MetadataStore:
    return request.app[METADATA]


def migration_json(migration: migrations.Migration, ranges_total: int, ranges_copied: int) -> dict[str, Any]:
    """A migration as the admin API (and `dialogs status --json`) shows it."""
    return {
        "migration_id": migration.migration_id,
        "kind": migration.kind,
        "shard_id": migration.shard_id,
        "from_version": migration.from_version,
        "to_version": migration.target_map.map_version,
        "phase": migration.phase,
        "abort_requested": migration.abort_requested,
        "rows_per_second": migration.rows_per_second,
        "batch_size": migration.batch_size,
        "rows_total": migration.rows_total,
        "rows_copied": migration.rows_copied,
        "rows_remaining": max(migration.rows_total - migration.rows_copied, 0),
        "delta_copied": migration.delta_copied,
        "ranges_total": ranges_total,
        "ranges_copied": ranges_copied,
        "cutover_attempts": migration.cutover_attempts,
        "last_pause_ms": migration.last_pause_ms,
        "error": migration.error,
        "elapsed_seconds": round(migration.elapsed_seconds, 3),
    }


async def _migration_response(request: web.Request, migration: migrations.Migration, status: int = 200) -> web.Response:
    total, copied = await _store(request).range_counts(migration.migration_id)
    return json_response(migration_json(migration, total, copied), status=status)


async def _start(
    request: web.Request,
    kind: str,
    shard_id: str,
    target: shard_map.ShardMap,
    current: shard_map.ShardMap,
    throttle: tuple[int | None, int | None],
) -> web.Response:
    rows_per_second, batch_size = throttle
    migration = await _store(request).start_migration(
        kind, shard_id, target, current, rows_per_second or 0, batch_size or 5000
    )
    return await _migration_response(request, migration, status=202)


async def _refuse_if_busy(request: web.Request) -> None:
    """The same 409 ``start_migration`` gives, early: before an add connects to every shard."""
    running = await _store(request).active_migration()
    if running is not None:
        raise errors.Conflict(f"migration {running.migration_id} is still running; one at a time")


async def list_shards(request: web.Request) -> web.Response:
    _require_admin(request)
    store = _store(request)
    current = await store.active_map()
    registry = await store.registered_shards()
    live = await store.workers()
    shares = current.ring.shares()
    ttl = request.app[SETTINGS].worker_ttl
    return json_response(
        [
            {
                "shard_id": row["shard_id"],
                "dsn": redact(row["dsn"]),
                "in_map": row["shard_id"] in current.weights,
                "weight": current.weights.get(row["shard_id"]),
                "share": round(shares.get(row["shard_id"], 0.0), 6),
                "retired": row["retired_at"] is not None,
                "workers": [w.url for w in live if w.shard_id == row["shard_id"] and w.age_seconds <= ttl],
            }
            for row in registry
        ]
    )


async def add_shard(request: web.Request) -> web.Response:
    _require_admin(request)
    data = await _body(request)
    shard_id, dsn = data.get("shard_id"), data.get("dsn")
    if not isinstance(shard_id, str):
        raise errors.InvalidInput("shard_id must be a string")
    try:
        shard_map.validate_shard_id(shard_id)
    except ValueError as exc:
        raise errors.InvalidInput(str(exc)) from None
    problem = dsn_problem(dsn)
    if problem is not None or not isinstance(dsn, str):
        raise errors.InvalidInput(f"dsn {problem}")
    weight = _int(data, "weight", 1, 1, shard_map.MAX_WEIGHT)
    throttle = _throttle(data)
    store = _store(request)
    current = await store.active_map()
    if shard_id in current.weights:
        raise errors.Conflict(f"shard {shard_id} is already in the shard map")
    await _refuse_if_busy(request)
    urls = _patroni_urls(data.get("patroni_urls"))
    await _check_new_database(store, shard_id, dsn)
    await store.register_shard(shard_id, dsn, urls)
    return await _start(request, "add", shard_id, current.with_shard(shard_id, weight or 1), current, throttle)


def _patroni_urls(value: Any) -> list[str]:
    """A replicated shard's members' Patroni REST URLs (optional: [] for one server)."""
    return [] if value is None else checks.rest_urls(value, "patroni_urls")


async def switchover(request: web.Request) -> web.Response:
    """A planned switchover of a replicated shard (or of the metadata database, ``meta``):
    its primary hands over to a standby."""
    _require_admin(request)
    shard_id = request.match_info["shard_id"]
    data = await _body(request)
    candidate = data.get("to")
    if candidate is not None and not isinstance(candidate, str):
        raise errors.InvalidInput("to must be a member's name")
    store = _store(request)
    urls = await store.patroni_urls(shard_id)
    if urls is None and shard_id == shard_map.METADATA_NAME:
        urls = await store.metadata_patroni_urls()
        if not urls:
            raise errors.Conflict("the metadata database is not replicated (no Patroni members registered)")
    if urls is None:
        raise errors.ShardNotFound(f"no shard {shard_id}")
    if not urls:
        raise errors.Conflict(f"shard {shard_id} is not replicated (no Patroni members registered)")
    workers = request.app[TOPOLOGY].workers(shard_id)  # none for `meta`
    done = await switchover_of(urls, candidate, workers, request.app[SETTINGS].internal_secret)
    return json_response(
        {
            "shard_id": shard_id,
            "from": done.old,
            "to": done.new,
            "seconds": done.seconds,
            "workers": done.paused.workers,
            "workers_paused": done.paused.paused,
        }
    )


async def replication(request: web.Request) -> web.Response:
    """Each replicated database's members as their Patroni reports them (role, state,
    timeline, lag): the shards not retired, and `meta`. Empty when nothing is replicated."""
    _require_admin(request)
    groups = await _store(request).patroni_groups()
    views = await asyncio.gather(*(group_members(urls) for urls in groups.values()))
    return json_response(dict(zip(groups, views, strict=True)))


async def _holdings(dsn: str) -> Holdings:
    try:
        con = await pg.connect(dsn, timeout=CONNECT_TIMEOUT)
    except _UNREACHABLE as exc:
        raise errors.InvalidInput(f"cannot connect to {redact(dsn)}: {exc}") from None
    try:
        return await shard_sql.holdings(con)
    finally:
        await con.close()


async def _check_new_database(store: MetadataStore, shard_id: str, dsn: str) -> None:
    """Refuse a database that is already a shard's, or serves ranges, or holds messages: a copy
    target deletes rows in the ranges it receives (docs/resharding.md, "Choosing a target").

    The other shards are compared by identity (server, database, schema), not by DSN text.
    One that cannot be reached now is skipped: a shard's database always has ranges, so the
    holdings check refuses it all the same, and the runner checks again before it copies.
    """
    target = await _holdings(dsn)
    rows = [r for r in await store.registered_shards() if r["retired_at"] is None and r["shard_id"] != shard_id]
    found = await asyncio.gather(*(_holdings(row["dsn"]) for row in rows), return_exceptions=True)
    others = {row["shard_id"]: h.identity for row, h in zip(rows, found, strict=True) if isinstance(h, Holdings)}
    problem = target_problem(target, others)
    if problem is not None:
        raise errors.Conflict(f"cannot add {shard_id} with {redact(dsn)}: {problem}")


async def remove_shard(request: web.Request) -> web.Response:
    _require_admin(request)
    shard_id = request.match_info["shard_id"]
    throttle = _throttle(dict(_query_ints(request)))
    current = await _store(request).active_map()
    if shard_id not in current.weights:
        raise errors.ShardNotFound(f"shard {shard_id} is not in the shard map")
    if len(current.weights) == 1:
        raise errors.Conflict("cannot remove the last shard")
    return await _start(request, "remove", shard_id, current.without_shard(shard_id), current, throttle)


def _query_ints(request: web.Request) -> dict[str, int]:
    values = {}
    for name in ("rows_per_second", "batch_size"):
        if name in request.query:
            try:
                values[name] = int(request.query[name])
            except ValueError:
                raise errors.InvalidInput(f"{name} must be an integer") from None
    return values


async def set_weight(request: web.Request) -> web.Response:
    _require_admin(request)
    shard_id = request.match_info["shard_id"]
    data = await _body(request)
    weight = _int(data, "weight", None, 1, shard_map.MAX_WEIGHT)
    if weight is None:
        raise errors.InvalidInput(f"weight must be an integer from 1 to {shard_map.MAX_WEIGHT}")
    throttle = _throttle(data)
    current = await _store(request).active_map()
    if shard_id not in current.weights:
        raise errors.ShardNotFound(f"shard {shard_id} is not in the shard map")
    if current.weights[shard_id] == weight:
        raise errors.Conflict(f"shard {shard_id} already has weight {weight}")
    return await _start(request, "weight", shard_id, current.with_weight(shard_id, weight), current, throttle)


async def get_map(request: web.Request) -> web.Response:
    _require_admin(request)
    current = await _store(request).active_map()
    shares = current.ring.shares()
    body = current.to_json()
    for entry in body["shards"]:
        entry["share"] = round(shares[entry["shard_id"]], 6)
    return json_response(body)


async def list_migrations(request: web.Request) -> web.Response:
    _require_admin(request)
    store = _store(request)
    shown = []
    for migration in await store.recent_migrations():
        total, copied = await store.range_counts(migration.migration_id)
        shown.append(migration_json(migration, total, copied))
    return json_response(shown)


def _migration_id(request: web.Request) -> int:
    try:
        migration_id = int(request.match_info["migration_id"])
    except ValueError:
        migration_id = 0
    if not 1 <= migration_id <= INT64_MAX:
        raise errors.InvalidInput(f"migration_id must be an integer from 1 to {INT64_MAX}")
    return migration_id


async def get_migration(request: web.Request) -> web.Response:
    _require_admin(request)
    return await _migration_response(request, await _store(request).migration(_migration_id(request)))


async def abort_migration(request: web.Request) -> web.Response:
    _require_admin(request)
    migration = await _store(request).request_abort(_migration_id(request))
    return await _migration_response(request, migration, status=202)


async def throttle_migration(request: web.Request) -> web.Response:
    _require_admin(request)
    rows_per_second, batch_size = _throttle(await _body(request), defaults=False)
    migration = await _store(request).set_throttle(_migration_id(request), rows_per_second, batch_size)
    return await _migration_response(request, migration)


async def verify_inbox(request: web.Request) -> web.Response:
    """Recount every inbox from the dialogs and compare (``proxy/inbox_verify.py``); with
    ``{"repair": true}``, also rewrite what differs. A repair is refused while a migration
    runs: its target's copies are the migration's to verify. A comparison that a cutover
    overlapped (the map changed meanwhile) is refused after the fact: rows moved under it."""
    _require_admin(request)
    data = await _body(request)
    repair = data.get("repair", False)
    if not isinstance(repair, bool):
        raise errors.InvalidInput("repair must be true or false")
    settle = _int(data, "settle_seconds", 30, 0, 600)
    store = _store(request)
    migrating = await store.active_migration() is not None
    if repair and migrating:
        raise errors.Conflict("a migration is running: repair the inbox once it has finished")
    shard_map = await store.active_map()
    async with store.connection() as con:
        dsns = await maps.shard_dsns(con)
    unknown = [shard_id for shard_id in shard_map.shard_ids if shard_id not in dsns]
    if unknown:
        raise errors.ShardUnavailable(f"no database registered for {', '.join(unknown)}")
    try:
        report = await inbox_verify.verify(
            dsns, shard_map, repair=repair, settle=float(settle or 0), migrating=migrating
        )
    except pg.FAILURES as exc:
        raise errors.ShardUnavailable(f"cannot read every shard: {exc or type(exc).__name__}") from None
    if (await store.active_map()).map_version != shard_map.map_version:
        # A migration's cutover came in between: rows moved under the comparison.
        raise errors.Conflict("the shard map changed while verifying (a migration's cutover): run it again")
    return json_response(report.to_json())


def setup_routes(app: web.Application) -> None:
    router = app.router
    router.add_post("/admin/inbox/verify", verify_inbox)
    router.add_get("/admin/shards", list_shards)
    router.add_post("/admin/shards", add_shard)
    router.add_delete("/admin/shards/{shard_id}", remove_shard)
    router.add_put("/admin/shards/{shard_id}/weight", set_weight)
    router.add_post("/admin/shards/{shard_id}/switchover", switchover)
    router.add_get("/admin/replication", replication)
    router.add_get("/admin/map", get_map)
    router.add_get("/admin/migrations", list_migrations)
    router.add_get("/admin/migrations/{migration_id}", get_migration)
    router.add_patch("/admin/migrations/{migration_id}", throttle_migration)
    router.add_post("/admin/migrations/{migration_id}/abort", abort_migration)
