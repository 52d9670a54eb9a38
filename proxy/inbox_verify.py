"""`dialogs inbox verify [--repair]`: recount every inbox from the dialogs and compare.

The inbox is a projection (docs/inbox.md): what each user's rows and badge must hold
follows from the dialogs' states on their shards. This reads every served dialog's
snapshot, projects it, and compares the result with every inbox row and total of every
shard: a row missing, different (stale or corrupt), on a shard that does not own its user,
or a total that is not the sum of its rows. Changes still in an outbox are waited for
first (up to ``settle`` seconds), and a difference counts only if it is still there after
the outboxes drained again: a verify under traffic reports what does not heal by itself.

``repair`` rewrites what differs from the recount, shard by shard in one transaction
that holds the appliers off (a lock on the inbox's tables), then recounts the totals from
their rows. It is refused while a migration runs (the admin API's check):
a migration's copies are its own to verify.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from dialogs import inbox, pg
from dialogs.shard_map import ShardMap
from proxy.migration.shard_sql import FENCE_LOCK

Pair = tuple[uuid.UUID, uuid.UUID]  # (owner, peer)
# Owners' rows: (owner, peer) -> the row as stored, with the shard that holds it.
Stored = dict[Pair, tuple[str, inbox.InboxRow]]
Totals = dict[tuple[str, uuid.UUID], tuple[int, int]]  # (shard, owner) -> (unread, dialogs)


# Rows and totals of the users a shard serves; with ``unheld``, also of users whose key it
# does not hold at all (misplaced rows). While a migration runs, its targets' copies
# ('incoming') and what its sources keep after the flip until cleanup are the migration's.
_SERVED = "range_state(user_key) IN ('owned', 'migrating', 'frozen', 'leaving')"
_UNHELD = "range_state(user_key) IS NULL"


@dataclass
class Report:
    dialogs: int = 0  # dialogs recounted
    rows: int = 0  # inbox rows expected
    missing: list[str] = field(default_factory=list)
    different: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)  # no such dialog, or on a shard not the owner's
    totals: list[str] = field(default_factory=list)
    pending: int = 0  # outbox rows not applied when the comparison ran
    repaired: int = 0

    @property
    def differences(self) -> int:
        return len(self.missing) + len(self.different) + len(self.extra) + len(self.totals)

    def to_json(self) -> dict[str, Any]:
        return {
            "dialogs": self.dialogs,
            "rows": self.rows,
            "differences": self.differences,
            "missing": self.missing[:20],
            "different": self.different[:20],
            "extra": self.extra[:20],
            "totals": self.totals[:20],
            "pending": self.pending,
            "repaired": self.repaired,
        }


@asynccontextmanager
async def _connections(dsns: dict[str, str], timeout: float) -> AsyncIterator[dict[str, asyncpg.Connection]]:
    async with AsyncExitStack() as stack:
        cons = {}
        for shard_id, dsn in dsns.items():
            con = await pg.connect(dsn, timeout=timeout, command_timeout=max(timeout, 60.0))
            stack.push_async_callback(con.close)
            cons[shard_id] = con
        yield cons


async def verify(
    dsns: dict[str, str],
    shard_map: ShardMap,
    repair: bool = False,
    settle: float = 30.0,
    timeout: float = 10.0,
    migrating: bool = False,
) -> Report:
    """Compare (and with ``repair``, fix) the inboxes of every shard of ``shard_map``.
    ``migrating``: a migration runs (its copies and leftovers are not compared; no repair)."""
    if repair and migrating:
        raise ValueError("no repair while a migration runs")
    async with _connections({s: dsns[s] for s in shard_map.shard_ids}, timeout) as cons:
        report = await _compare(cons, shard_map, settle, migrating)
        for _ in range(3):  # differences under traffic: compare again once the outboxes drained
            if not report.differences:
                break
            await asyncio.sleep(0.5)
            report = await _compare(cons, shard_map, settle, migrating)
        if repair and report.differences:
            report.repaired = await _repair(cons, shard_map)
        return report


async def _drained(cons: dict[str, asyncpg.Connection], settle: float) -> int:
    """Wait until every outbox row there is now has been applied (under traffic, newer ones
    keep coming: those are not waited for), or ``settle`` seconds; the rows still pending."""
    heads = {s: await con.fetchval("SELECT coalesce(max(seq), 0) FROM inbox_outbox") for s, con in cons.items()}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settle
    while True:
        pending = 0
        for shard_id, con in cons.items():
            pending += await con.fetchval("SELECT count(*) FROM inbox_outbox WHERE seq <= $1", heads[shard_id])
        if not pending or loop.time() >= deadline:
            return int(pending)
        await asyncio.sleep(0.1)


async def _expected(cons: dict[str, asyncpg.Connection]) -> tuple[int, dict[Pair, inbox.InboxRow]]:
    dialogs, expected = 0, {}
    for con in cons.values():
        for snapshot in await con.fetch(inbox.SERVED_SNAPSHOTS):
            dialogs += 1
            for row in inbox.project(snapshot):
                expected[(row.owner, row.peer)] = row
    return dialogs, expected


async def _stored(cons: dict[str, asyncpg.Connection], unheld: bool) -> tuple[Stored, Totals]:
    rows: Stored = {}
    totals: Totals = {}
    held = f"{_SERVED} OR {_UNHELD}" if unheld else _SERVED
    for shard_id, con in cons.items():
        for record in await con.fetch(f"SELECT * FROM inbox WHERE {held}"):
            row = inbox.InboxRow.from_record(record)
            rows[(row.owner, row.peer)] = (shard_id, row)
        for record in await con.fetch(f"SELECT owner, unread, dialogs FROM inbox_totals WHERE {held}"):
            totals[(shard_id, record["owner"])] = (record["unread"], record["dialogs"])
    return rows, totals


async def _compare(cons: dict[str, asyncpg.Connection], shard_map: ShardMap, settle: float, migrating: bool) -> Report:
    report = Report(pending=await _drained(cons, settle))
    # Stored first, then the dialogs: a row applied in between is newer than what was read
    # as stored, never newer than the dialog's state read after it.
    stored, totals = await _stored(cons, unheld=not migrating)
    report.dialogs, expected = await _expected(cons)
    report.rows = len(expected)
    sums: Totals = {}
    for key, want in expected.items():
        home = shard_map.owner(want.user_key)
        unread, dialogs = sums.get((home, want.owner), (0, 0))
        sums[(home, want.owner)] = (unread + want.unread, dialogs + (want.unread > 0))
        found = stored.get(key)
        if found is None or found[0] != home:
            report.missing.append(f"{want.owner} with {want.peer} (on {home})")
        elif found[1] != want:
            report.different.append(f"{want.owner} with {want.peer} on {home}: {_fields_apart(found[1], want)}")
    for key, (shard_id, row) in stored.items():
        if key not in expected or shard_map.owner(row.user_key) != shard_id:
            report.extra.append(f"{row.owner} with {row.peer} on {shard_id}")
    for place in sorted(set(totals) | set(sums), key=str):
        if totals.get(place, (0, 0)) != sums.get(place, (0, 0)):
            report.totals.append(
                f"{place[1]} on {place[0]}: stored {_total(totals.get(place))}, recounted {_total(sums.get(place))}"
            )
    return report


def _total(total: tuple[int, int] | None) -> str:
    return "none" if total is None else f"(unread {total[0]}, dialogs {total[1]})"


def _fields_apart(stored: inbox.InboxRow, recounted: inbox.InboxRow) -> str:
    """Which fields of a row differ, stored against recounted (a text only as "differs":
    the report is an operator's, not a reader of the users' messages)."""
    apart = []
    for name in inbox.INBOX_COLUMNS:
        mine, theirs = getattr(stored, name), getattr(recounted, name)
        if mine != theirs:
            apart.append(f"{name} differs" if name == "last_text" else f"{name} {mine} (recount: {theirs})")
    return ", ".join(apart)


async def _repair(cons: dict[str, asyncpg.Connection], shard_map: ShardMap) -> int:
    """Make every shard's inbox the recount, shard by shard. Returns the rows rewritten or
    deleted."""
    changed = 0
    for shard_id, con in cons.items():
        changed += await _repair_shard(con, shard_id, cons, shard_map)
    return changed


# Every total recounted from its rows; a total left without rows is deleted (a migration
# copies rows, and totals with them: an empty one would exist on one side only).
_RECOUNT_TOTALS = """
DELETE FROM inbox_totals t WHERE NOT EXISTS (SELECT 1 FROM inbox i WHERE i.user_key = t.user_key AND i.owner = t.owner);
INSERT INTO inbox_totals AS t (user_key, owner, unread, dialogs)
SELECT user_key, owner, sum(unread), count(*) FILTER (WHERE unread > 0) FROM inbox GROUP BY 1, 2
ON CONFLICT (user_key, owner) DO UPDATE SET unread = EXCLUDED.unread, dialogs = EXCLUDED.dialogs
WHERE (t.unread, t.dialogs) IS DISTINCT FROM (EXCLUDED.unread, EXCLUDED.dialogs)
"""


async def _repair_shard(
    con: asyncpg.Connection, shard_id: str, cons: dict[str, asyncpg.Connection], shard_map: ShardMap
) -> int:
    """One shard's inbox made the recount, in one transaction that appliers wait for (the
    lock below conflicts with any write of the inbox's rows or totals). The recount is read
    once the lock is held, so no applier can store a newer row meanwhile; a stored row newer
    than the recount (an applier that went first) is kept."""
    async with con.transaction():
        await con.execute("SELECT pg_advisory_xact_lock_shared($1)", FENCE_LOCK)  # behind the fence, as writers
        await con.execute("LOCK TABLE inbox, inbox_totals IN SHARE ROW EXCLUSIVE MODE")
        _, expected = await _expected(cons)
        wanted = {key: row for key, row in expected.items() if shard_map.owner(row.user_key) == shard_id}
        stored = {
            (r["owner"], r["peer"]): inbox.InboxRow.from_record(r) for r in await con.fetch("SELECT * FROM inbox")
        }
        wrong = [
            key
            for key, row in stored.items()
            if key not in wanted or (row != wanted[key] and row.version <= wanted[key].version)
        ]
        absent = [row for key, row in wanted.items() if key not in stored or key in wrong]
        if wrong:
            await con.execute(
                "DELETE FROM inbox i USING unnest($1::uuid[], $2::uuid[]) AS k(owner, peer)"
                " WHERE i.owner = k.owner AND i.peer = k.peer",
                [k[0] for k in wrong],
                [k[1] for k in wrong],
            )
        if absent:
            await con.execute(
                "INSERT INTO inbox SELECT * FROM jsonb_populate_recordset(NULL::inbox, $1::jsonb)",
                inbox.rows_json(absent),
            )
        await con.execute(_RECOUNT_TOTALS)
        return len(set(wrong) | {(row.owner, row.peer) for row in absent})
