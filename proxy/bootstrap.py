"""Bring a cluster's databases to a servable state: schemas, the first map, range ownership.

Idempotent; used by ``python -m proxy.bootstrap`` (`dialogs bootstrap`), the local
supervisor and the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

import asyncpg

from dialogs import checks, errors, logs, pg, schema
from dialogs.metastore import maps
from dialogs.migration_plan import Span
from dialogs.pg import dsn_problem
from dialogs.serve import settings_or_exit
from dialogs.shard_map import ShardMap
from proxy.migration import shard_sql
from proxy.settings import BootstrapSettings


async def bootstrap(
    metadata_dsn: str,
    shards: dict[str, str],
    patroni: dict[str, list[str]] | None = None,
    metadata_patroni: list[str] | None = None,
    wait: float = 0.0,
) -> ShardMap:
    """Upgrade the metadata schema and ``shards``' (id -> DSN); on an empty cluster write map 1.
    ``patroni``: the members' REST URLs of replicated shards (for the admin API's switchover
    and Prometheus' discovery); ``metadata_patroni``: those of the metadata database's group.
    ``wait``: seconds to keep trying a database that is not available yet.

    Shards of the active map whose range table is empty are given their ranges (a fresh
    cluster); shards that already have ranges are left alone.
    """
    con = await _connect(metadata_dsn, "the metadata database", wait)
    try:
        await schema.upgrade_metadata(con)
        active = await maps.bootstrap(con, shards)
        for shard_id, urls in (patroni or {}).items():
            await maps.set_patroni_urls(con, shard_id, urls)
        if metadata_patroni is not None:
            await maps.set_metadata_patroni_urls(con, metadata_patroni)
    finally:
        await con.close()
    ranges = active.ring.ranges()
    for shard_id, dsn in shards.items():
        shard = await _connect(dsn, f"shard {shard_id}", wait)
        try:
            await schema.upgrade_shard(shard)
            if shard_id in active.weights:
                spans = [Span(r.lo, r.hi) for r in ranges if r.shard_id == shard_id]
                await shard_sql.claim_if_empty(shard, spans)
        finally:
            await shard.close()
    return active


def parse_shards(entries: list[str]) -> dict[str, str]:
    """``["shard-1=postgresql://…", …]`` as {shard_id: dsn}; ValueError names a bad entry."""
    parsed = {}
    for entry in entries:
        shard_id, sep, dsn = entry.partition("=")
        if not sep or not shard_id:
            raise ValueError("--shard expects ID=postgresql://…")
        problem = dsn_problem(dsn)
        if problem is not None:
            raise ValueError(f"the DSN of --shard {shard_id} {problem}")
        parsed[shard_id] = dsn
    return parsed


def parse_patroni(entries: list[str], shards: dict[str, str]) -> dict[str, list[str]]:
    """``["shard-1=http://a:8008,http://b:8008", …]`` as {shard_id: urls}, each shard one of
    ``shards``; ValueError names a bad entry."""
    parsed: dict[str, list[str]] = {}
    for entry in entries:
        shard_id, sep, urls = entry.partition("=")
        if not sep or shard_id not in shards:
            raise ValueError(f"--patroni expects ID=URL[,URL…] with ID one of the --shard ids, not {entry!r}")
        if shard_id in parsed:
            raise ValueError(f"--patroni {shard_id} is given twice: name every member in one list")
        parsed[shard_id] = parse_urls(urls, f"--patroni {shard_id}")
    return parsed


def parse_urls(text: str, what: str) -> list[str]:
    """A comma-separated list of Patroni REST URLs (``http(s)://host:port``)."""
    urls = [url.strip() for url in text.split(",") if url.strip()]
    if not urls:
        raise ValueError(f"{what}: no URL given")
    try:
        return checks.rest_urls(urls, what)
    except errors.InvalidInput as exc:
        raise ValueError(exc.message) from None


class BootstrapError(Exception):
    """A database bootstrap cannot reach or log in to: said in one sentence, exit 1."""


async def _connect(dsn: str, what: str, wait: float) -> asyncpg.Connection:
    """A connection to ``dsn``'s primary, tried again every second for ``wait`` seconds while
    the database is unavailable (down, starting, a replicated group with no primary yet); a
    refused login or a missing database fails at once."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return await pg.connect(dsn, timeout=10)
        except pg.UNAVAILABLE as exc:
            if time.monotonic() >= deadline:
                # asyncpg's messages name the host and user, never the password.
                raise BootstrapError(f"cannot connect to {what}: {exc or type(exc).__name__}") from None
            await asyncio.sleep(1)
        except asyncpg.PostgresError as exc:
            raise BootstrapError(f"cannot connect to {what}: {exc or type(exc).__name__}") from None


async def upgrade_metadata(
    metadata_dsn: str, metadata_patroni: list[str] | None = None, wait: float = 0.0
) -> list[str]:
    """Upgrade the metadata schema (and record its group's Patroni members, when given)."""
    con = await _connect(metadata_dsn, "the metadata database", wait)
    try:
        applied = await schema.upgrade_metadata(con)
        if metadata_patroni is not None:
            await maps.set_metadata_patroni_urls(con, metadata_patroni)
        return applied
    finally:
        await con.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m proxy.bootstrap",
        description="Upgrade the metadata schema; with --shard, also the shards' schemas and, on an empty"
        " cluster, write the first shard map over them.",
    )
    parser.add_argument("--metadata-dsn", help="the metadata database (default: $DIALOGS_METADATA_DSN)")
    parser.add_argument("--shard", action="append", default=[], metavar="ID=DSN", help="a shard to register")
    parser.add_argument(
        "--patroni",
        action="append",
        default=[],
        metavar="ID=URL[,URL…]",
        help="the Patroni REST API of each member of a replicated --shard",
    )
    parser.add_argument(
        "--metadata-patroni",
        metavar="URL[,URL…]",
        help="the Patroni REST API of each member of a replicated metadata database",
    )
    args = parser.parse_args(argv)
    try:
        shards = parse_shards(args.shard)
        patroni = parse_patroni(args.patroni, shards)
        metadata_patroni = (
            parse_urls(args.metadata_patroni, "--metadata-patroni") if args.metadata_patroni is not None else None
        )
    except ValueError as exc:
        parser.error(str(exc))
    environ = dict(os.environ)
    if args.metadata_dsn:
        environ["DIALOGS_METADATA_DSN"] = args.metadata_dsn
    settings = settings_or_exit(BootstrapSettings, environ)
    logs.configure("bootstrap", settings.log_level)
    try:
        if shards:
            shard_map = asyncio.run(
                bootstrap(settings.metadata_dsn, shards, patroni, metadata_patroni, settings.connect_wait)
            )
            print(f"active shard map version {shard_map.map_version}: {', '.join(shard_map.shard_ids)}")
        else:
            applied = asyncio.run(upgrade_metadata(settings.metadata_dsn, metadata_patroni, settings.connect_wait))
            print(f"metadata schema upgrades applied: {', '.join(applied) or 'none (up to date)'}")
    except BootstrapError as exc:
        print(f"bootstrap failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
