"""The two database schemas, and the versioned upgrades that build them.

``metadata/``: users, shards, shard maps, registrations, migrations (resharding).
``shard/``: messages, range ownership and the fence, the catch-up log, dialog states, the inbox.

An upgrade is a file ``NNNN_name.sql`` in one of those folders. Each is applied once, in a
transaction, and recorded in ``schema_migrations`` (the table keeps the name it was
created with). An advisory lock serialises processes
starting together (several workers of one shard, several proxies).
"""

from __future__ import annotations

import importlib.resources
import re

import asyncpg

_FILE = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
_LOCK_KEY = 0x6469616C6F6773  # "dialogs"


def upgrades(package: str) -> list[tuple[int, str, str]]:
    """(version, file name, SQL) for every upgrade in ``package``, in order."""
    found = []
    for entry in importlib.resources.files(package).iterdir():
        match = _FILE.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    found.sort()
    versions = [version for version, _, _ in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"two schema upgrades share a version in {package}: {versions}")
    return found


METADATA = "dialogs.schema.metadata"
SHARD = "dialogs.schema.shard"


async def upgrade_metadata(con: asyncpg.Connection) -> list[str]:
    """Bring the metadata database's schema up to date; the names of the files applied now."""
    return await apply(con, METADATA)


async def upgrade_shard(con: asyncpg.Connection, until: int | None = None) -> list[str]:
    """Bring a shard database's schema up to date (or to version ``until``: a database of an
    earlier release, for tests and the bench); the names of the files applied now."""
    applied = await apply(con, SHARD, until)
    if "0006_dialog_state.sql" in applied:
        # Sends by other workers with the previous store_messages may have stored messages
        # uncounted while the upgrade ran: recount behind the fence (see the file).
        await con.execute("SELECT recount_dialog_states()")
    if "0007_inbox.sql" in applied:
        # Likewise for sends not announced in the inbox's outbox (see the file).
        await con.execute("SELECT announce_dialogs()")
    return applied


async def apply(con: asyncpg.Connection, package: str, until: int | None = None) -> list[str]:
    """Apply what is missing (up to version ``until``, if given); return the names applied now."""
    applied_now = []
    async with con.transaction():
        await con.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
        await con.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {row["version"] for row in await con.fetch("SELECT version FROM schema_migrations")}
        for version, name, sql in upgrades(package):
            if version in done or (until is not None and version > until):
                continue
            await con.execute(sql)
            await con.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name)
            applied_now.append(name)
    return applied_now
