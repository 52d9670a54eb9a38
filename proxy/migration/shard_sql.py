"""Resharding's SQL on shard databases: range ownership, copying, verification.

The worker's own SQL is in ``dialog_api/storage.py``; this module is what the migration
runner (``proxy/migration/runner.py``) and the bootstrap do to shards from outside.
Every function takes a connection to one shard database.
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import AsyncIterator, Sequence

import asyncpg
import orjson

from dialogs import inbox
from dialogs.metastore.migrations import Cursor, Watermark
from dialogs.migration_plan import Holdings, Span
from dialogs.wire import Ownership

# The advisory lock key every write takes shared inside its transaction (see
# store_messages in dialogs/schema/shard/0002_fencing.sql).
FENCE_LOCK = 7236281096744167283

COLUMNS = ("dialog_key", "user_lo", "user_hi", "id", "from_lo", "text", "created_at", "idempotency_key")
_SELECT_COLUMNS = ", ".join(COLUMNS)
_M_COLUMNS = ", ".join("m." + c for c in COLUMNS)
_KEY = "(dialog_key, user_lo, user_hi, id)"
# A dialog's state row (dialogs/schema/shard/0006_dialog_state.sql) moves with its messages.
STATE_COLUMNS = (
    "dialog_key",
    "user_lo",
    "user_hi",
    "version",
    "sent_lo",
    "sent_hi",
    "read_lo",
    "read_hi",
    "read_count_lo",
    "read_count_hi",
)

# Rows of transactions older than the reader's snapshot xmin: all finished, so none can
# still commit behind a watermark that moves past them.
_HORIZON = "pg_snapshot_xmin(pg_current_snapshot())::text::bigint"


def watermark_of(row: asyncpg.Record) -> Watermark:
    return row["xid"], row["seq"]


# --- ownership -------------------------------------------------------------------------


async def identity(con: asyncpg.Connection) -> str:
    """Where this connection's tables live: the server's system identifier, the database's
    oid and the schema unqualified names resolve to (tests give each shard a schema)."""
    row = await con.fetchrow(
        "SELECT (SELECT system_identifier FROM pg_control_system()),"
        " (SELECT oid FROM pg_database WHERE datname = current_database()), current_schema()"
    )
    return f"{row[0]}/{row[1]}/{row[2]}"


async def ranges_besides(con: asyncpg.Connection, spans: Sequence[Span]) -> int:
    """Ranges this database has other than ``spans`` (a target's own, not a migration's)."""
    return await con.fetchval(
        "SELECT count(*) FROM shard_ranges WHERE NOT lo = ANY($1::bigint[])", [s.lo for s in spans]
    )


async def holdings(con: asyncpg.Connection) -> Holdings:
    """What the database already holds, for ``migration_plan.target_problem`` (a fresh one: nothing)."""
    states: dict[str, int] = {}
    messages = False
    if await con.fetchval("SELECT to_regclass('shard_ranges')") is not None:
        states = dict(await con.fetch("SELECT state, count(*) FROM shard_ranges GROUP BY state"))
    if await con.fetchval("SELECT to_regclass('messages')") is not None:
        messages = await con.fetchval("SELECT EXISTS (SELECT 1 FROM messages)")
    return Holdings(await identity(con), states, messages)


async def claim_if_empty(con: asyncpg.Connection, spans: Sequence[Span]) -> bool:
    """A fresh shard of the first map owns its ranges. False if it already had ranges."""
    async with con.transaction():
        await con.execute("LOCK TABLE shard_ranges IN EXCLUSIVE MODE")
        if await con.fetchval("SELECT EXISTS (SELECT 1 FROM shard_ranges)"):
            return False
        await set_state(con, spans, Ownership.OWNED)
        return True


async def fenced(con: asyncpg.Connection, owned: Sequence[Span], states: dict[str, Sequence[Span]]) -> None:
    """Rewrite ranges behind the exclusive fence, in one transaction: in-flight writes finish
    first, later ones see the change.

    ``owned`` replaces whatever covered the same keys (used to split a source's ranges so
    that moving pieces get rows of their own); ``states`` sets the given spans' state.
    set_range_states() takes the fence lock too; taking it again in one transaction is free.
    """
    async with con.transaction():
        await con.execute("SELECT pg_advisory_xact_lock($1)", FENCE_LOCK)
        if owned:
            covered = [s for spans in states.values() for s in spans] + list(owned)
            await con.execute(
                """
                DELETE FROM shard_ranges r USING unnest($1::bigint[], $2::bigint[]) AS t(lo, hi)
                WHERE r.lo <= t.hi AND r.hi >= t.lo
                """,
                [s.lo for s in covered],
                [s.hi for s in covered],
            )
            await set_state(con, owned, Ownership.OWNED)
        for state, spans in states.items():
            await set_state(con, spans, state)


async def set_state(con: asyncpg.Connection, spans: Sequence[Span], state: str) -> None:
    """Give ``spans`` a state ('absent' to stop serving them) behind the fence, in one round trip."""
    await con.execute(
        "SELECT set_range_states($1::bigint[], $2::bigint[], $3)", [s.lo for s in spans], [s.hi for s in spans], state
    )


async def hand_over(con: asyncpg.Connection, spans: Sequence[Span]) -> bool:
    """Frozen ``spans`` stop serving reads too, keeping their lease; False (nothing changed
    that matters) if any lease ran out first: those ranges may have taken writes since."""
    done = await con.fetchval("SELECT hand_over_ranges($1::bigint[])", [s.lo for s in spans])
    return done == len(spans)


async def delta_keys(con: asyncpg.Connection, after: Watermark, until: Watermark | None = None) -> list[int]:
    """The dialog keys of delta rows in (after, until] (or past ``after``), finished or not."""
    until = until or (2**63 - 1, 2**63 - 1)
    return [
        row[0]
        for row in await con.fetch(
            "SELECT DISTINCT dialog_key FROM migration_delta WHERE (xid, seq) > ($1, $2) AND (xid, seq) <= ($3, $4)",
            *after,
            *until,
        )
    ]


async def delta_head(con: asyncpg.Connection) -> Watermark:
    """A watermark behind which nothing can still be logged: every row not visible now is past it."""
    return await con.fetchval(f"SELECT {_HORIZON}"), 0


# --- copying ---------------------------------------------------------------------------


def _after(cursor: Cursor, first: int) -> tuple[str, list[object]]:
    if cursor is None:
        return "TRUE", []
    return f"{_KEY} > (${first}::bigint, ${first + 1}::uuid, ${first + 2}::uuid, ${first + 3}::bigint)", list(cursor)


async def batch_end(con: asyncpg.Connection, span: Span, cursor: Cursor, batch: int) -> Cursor:
    """The key of the ``batch``-th row after ``cursor`` in ``span``, or None if fewer remain."""
    condition, args = _after(cursor, 4)
    row = await con.fetchrow(
        f"SELECT {_KEY.strip('()')} FROM messages WHERE dialog_key BETWEEN $1 AND $2 AND {condition}"
        f" ORDER BY {_KEY.strip('()')} OFFSET $3 LIMIT 1",
        span.lo,
        span.hi,
        batch - 1,
        *args,
    )
    return None if row is None else (row[0], row[1], row[2], row[3])


async def delete_after(con: asyncpg.Connection, span: Span, cursor: Cursor) -> int:
    """Remove what a crashed copy left past its last checkpoint (the target side of a resume).

    State rows stay: the copy brings each again, and a copied state replaces one only with
    a newer version (``upsert_states``), so an earlier copy's row is overwritten or equal."""
    condition, args = _after(cursor, 3)
    status = await con.execute(
        f"DELETE FROM messages WHERE dialog_key BETWEEN $1 AND $2 AND {condition}", span.lo, span.hi, *args
    )
    return int(status.split()[-1])


def copy_query(spans: Sequence[Span], after: Cursor = None, until: Cursor = None) -> tuple[str, list[object]]:
    """The SELECT a copy step streams out of the source, and its arguments."""
    if (after is not None or until is not None) and len(spans) != 1:
        raise ValueError("a cursor window needs exactly one span")
    lower, window = _after(after, 3)
    upper = "TRUE"
    if until is not None:
        index = 3 + len(window)
        upper = f"{_KEY} <= (${index}::bigint, ${index + 1}::uuid, ${index + 2}::uuid, ${index + 3}::bigint)"
        window += list(until)
    query = (
        f"SELECT {_M_COLUMNS} FROM unnest($1::bigint[], $2::bigint[]) AS r(lo, hi)"
        f" JOIN messages m ON m.dialog_key BETWEEN r.lo AND r.hi WHERE {lower} AND {upper}"
    )
    return query, [[s.lo for s in spans], [s.hi for s in spans], *window]


async def copy_rows(
    source: asyncpg.Connection,
    target: asyncpg.Connection,
    spans: Sequence[Span],
    after: Cursor = None,
    until: Cursor = None,
) -> int:
    """COPY the rows of ``spans`` (with a cursor window (after, until] for a single span) to the target.

    Binary COPY out of the source streams straight into COPY into the target, without
    decoding here, so the rate is close to PostgreSQL's own COPY; the target side is one
    transaction, so a failed read never commits half a batch. Returns rows copied.
    """
    query, args = copy_query(spans, after, until)
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=32)

    async def produce() -> None:
        try:
            await source.copy_from_query(query, *args, output=queue.put, format="binary")
        finally:
            await queue.put(None)

    async def chunks() -> AsyncIterator[bytes]:
        while (chunk := await queue.get()) is not None:
            yield chunk

    producer = asyncio.ensure_future(produce())
    try:
        async with target.transaction():
            status = await target.copy_to_table("messages", source=chunks(), columns=COLUMNS, format="binary")
            await producer  # a failed read must roll the target back, not commit half a batch
            # The window's dialogs' states, read after their messages (a later state is fine:
            # whatever changed it is in the delta log, which the catch-up copies).
            await upsert_states(target, await _window_states(source, spans, after, until))
    finally:
        if not producer.done():
            producer.cancel()
    return int(status.split()[-1])


async def _window_states(
    con: asyncpg.Connection, spans: Sequence[Span], after: Cursor, until: Cursor
) -> list[asyncpg.Record]:
    """State rows of the dialogs with a message in the window (after, until] of ``spans``
    (the dialogs at either end of a window are taken whole: copied twice, harmlessly)."""
    args: list[object] = [[s.lo for s in spans], [s.hi for s in spans]]
    conditions = ["TRUE"]
    for bound, op in ((after, ">="), (until, "<=")):
        if bound is not None:
            index = len(args) + 1
            conditions.append(
                f"(s.dialog_key, s.user_lo, s.user_hi) {op} (${index}::bigint, ${index + 1}::uuid, ${index + 2}::uuid)"
            )
            args += list(bound[:3])
    return await con.fetch(
        f"SELECT {', '.join('s.' + c for c in STATE_COLUMNS)} FROM unnest($1::bigint[], $2::bigint[]) AS r(lo, hi)"
        f" JOIN dialog_state s ON s.dialog_key BETWEEN r.lo AND r.hi WHERE {' AND '.join(conditions)}",
        *args,
    )


async def states_of(con: asyncpg.Connection, rows: Sequence[asyncpg.Record]) -> list[asyncpg.Record]:
    """The state rows of the dialogs of ``rows`` (message rows: delta or frozen ones)."""
    dialogs = sorted({(row["dialog_key"], row["user_lo"], row["user_hi"]) for row in rows})
    if not dialogs:
        return []
    columns = list(zip(*dialogs, strict=True))
    return await con.fetch(
        f"SELECT {', '.join('s.' + c for c in STATE_COLUMNS)} FROM dialog_state s"
        " JOIN unnest($1::bigint[], $2::uuid[], $3::uuid[]) AS k(dialog_key, user_lo, user_hi)"
        " USING (dialog_key, user_lo, user_hi)",
        *columns,
    )


def _states_json(states: Sequence[asyncpg.Record]) -> str:
    return orjson.dumps([dict(state) for state in states], default=str).decode()  # asyncpg UUIDs: str


async def upsert_states(con: asyncpg.Connection, states: Sequence[asyncpg.Record]) -> None:
    """Copied state rows: each replaces the target's only if its version is newer."""
    if states:
        await con.execute("SELECT upsert_states($1::jsonb)", _states_json(states))


async def span_counts(con: asyncpg.Connection, spans: Sequence[Span]) -> dict[int, int]:
    rows = await con.fetch(
        "SELECT r.lo, count(m.id) AS n FROM unnest($1::bigint[], $2::bigint[]) AS r(lo, hi)"
        " LEFT JOIN messages m ON m.dialog_key BETWEEN r.lo AND r.hi GROUP BY r.lo",
        [s.lo for s in spans],
        [s.hi for s in spans],
    )
    return {row["lo"]: row["n"] for row in rows}


async def delete_spans(con: asyncpg.Connection, spans: Sequence[Span]) -> int:
    """Delete every message, dialog state and inbox row (with its total) in ``spans`` (a
    target's leftovers; small by construction). Returns the messages deleted."""
    if not spans:
        return 0
    bounds = [s.lo for s in spans], [s.hi for s in spans]
    async with con.transaction():
        status = await con.execute(
            "DELETE FROM messages m USING unnest($1::bigint[], $2::bigint[]) AS r(lo, hi)"
            " WHERE m.dialog_key BETWEEN r.lo AND r.hi",
            *bounds,
        )
        await con.execute(
            "DELETE FROM dialog_state s USING unnest($1::bigint[], $2::bigint[]) AS r(lo, hi)"
            " WHERE s.dialog_key BETWEEN r.lo AND r.hi",
            *bounds,
        )
        for table in ("inbox", "inbox_totals"):
            await con.execute(
                f"DELETE FROM {table} t USING unnest($1::bigint[], $2::bigint[]) AS r(lo, hi)"
                " WHERE t.user_key BETWEEN r.lo AND r.hi",
                *bounds,
            )
    return int(status.split()[-1])


async def read_delta(
    con: asyncpg.Connection, after: Watermark, limit: int, finished_only: bool = True
) -> list[asyncpg.Record]:
    """Up to ``limit`` delta rows past ``after``, in (xid, seq) order, with their messages.

    ``finished_only``: only rows of transactions older than this snapshot's xmin (while
    writes flow, see catch-up). False once the ranges are no longer writable here and the
    fence has waited for every writer: then every row is final, and a long transaction
    elsewhere on the server (an operator's open BEGIN) must not hide any of them.
    """
    horizon = f"AND d.xid < {_HORIZON}" if finished_only else ""
    return await con.fetch(
        f"""
        SELECT d.xid, d.seq, {_M_COLUMNS}
        FROM migration_delta d
        JOIN messages m USING (dialog_key, user_lo, user_hi, id)
        WHERE (d.xid, d.seq) > ($1, $2) {horizon}
        ORDER BY d.xid, d.seq LIMIT $3
        """,
        *after,
        limit,
    )


async def delta_backlog(con: asyncpg.Connection, after: Watermark) -> int:
    return await con.fetchval("SELECT count(*) FROM migration_delta WHERE (xid, seq) > ($1, $2)", *after)


async def insert_rows(
    con: asyncpg.Connection, rows: Sequence[asyncpg.Record], states: Sequence[asyncpg.Record] = (), merge: bool = False
) -> None:
    """Idempotent insert (a row the initial copy already brought is skipped), and the
    dialogs' ``states`` (a newer version replaces an older one; with ``merge``, late writes
    after a flip: merged with the target's, see ``merge_states``), in one transaction."""
    if not rows and not states:
        return
    columns = [[row[c] for row in rows] for c in COLUMNS]
    async with con.transaction():
        await con.execute(
            f"""
            INSERT INTO messages ({_SELECT_COLUMNS})
            SELECT * FROM unnest($1::bigint[], $2::uuid[], $3::uuid[], $4::bigint[], $5::boolean[], $6::text[],
                                 $7::timestamptz[], $8::text[])
            ON CONFLICT DO NOTHING
            """,
            *columns,
        )
        if merge and states:
            await con.execute("SELECT merge_states($1::jsonb)", _states_json(states))
        else:
            await upsert_states(con, states)


async def clear_delta(con: asyncpg.Connection) -> None:
    """Empty the catch-up logs (messages and dialog states; inbox rows)."""
    await con.execute("DELETE FROM migration_delta; DELETE FROM inbox_delta")


# --- verification and cleanup ----------------------------------------------------------

Digests = dict[int, tuple[int, int]]


def _digests(rows: Sequence[asyncpg.Record]) -> Digests:
    return {row["lo"]: (row["rows"], int(row["checksum"])) for row in rows}


async def digests(con: asyncpg.Connection, spans: Sequence[Span]) -> Digests:
    """Per span: (row count, sum of row hashes). Equal on both sides means equal rows."""
    if not spans:
        return {}
    return _digests(
        await con.fetch(
            "SELECT lo, rows, checksum FROM range_digests($1::bigint[], $2::bigint[])",
            [s.lo for s in spans],
            [s.hi for s in spans],
        )
    )


async def freeze(
    con: asyncpg.Connection, spans: Sequence[Span], after: Watermark, lease: float
) -> tuple[list[asyncpg.Record], datetime.datetime]:
    """Freeze ``spans`` for ``lease`` seconds (writes refused until then) and return every delta
    row past ``after``, with the moment the lease ends by this server's clock."""
    rows = await con.fetch(
        "SELECT * FROM freeze_ranges($1::bigint[], $2::bigint[], $3, $4, $5)",
        [s.lo for s in spans],
        [s.hi for s in spans],
        *after,
        datetime.timedelta(seconds=lease),
    )
    ends = await con.fetchval(
        "SELECT min(lease_until) FROM shard_ranges WHERE lo = ANY($1::bigint[])", [s.lo for s in spans]
    )
    return rows, ends


# Digests keyed by ("range", lo) or ("dialog", dialog_key) (compared in verification.py).
MixedDigests = dict[tuple[str, int], tuple[int, int]]


def _mixed(rows: Sequence[asyncpg.Record]) -> MixedDigests:
    return {(row["kind"], row["key"]): (row["rows"], int(row["checksum"])) for row in rows}


async def mixed_digests(con: asyncpg.Connection, spans: Sequence[Span], keys: Sequence[int]) -> MixedDigests:
    """Digests of whole ``spans`` and of the single dialogs ``keys``, in one round trip."""
    return _mixed(
        await con.fetch(
            "SELECT kind, key, rows, checksum FROM digests($1::bigint[], $2::bigint[], $3::bigint[])",
            [s.lo for s in spans],
            [s.hi for s in spans],
            list(keys),
        )
    )


async def apply_and_digest(
    con: asyncpg.Connection,
    rows: Sequence[asyncpg.Record],
    states: Sequence[asyncpg.Record],
    spans: Sequence[Span],
    keys: Sequence[int],
) -> MixedDigests:
    """Insert copied ``rows`` (idempotently) and ``states`` (newer versions only), then digest
    ``spans`` and dialogs ``keys``, in one round trip."""
    columns = [[row[c] for row in rows] for c in COLUMNS]
    return _mixed(
        await con.fetch(
            "SELECT kind, key, rows, checksum FROM apply_and_digest($1::bigint[], $2::uuid[], $3::uuid[], $4::bigint[],"
            " $5::boolean[], $6::text[], $7::timestamptz[], $8::text[], $9::jsonb, $10::bigint[], $11::bigint[],"
            " $12::bigint[])",
            *columns,
            _states_json(states),
            [s.lo for s in spans],
            [s.hi for s in spans],
            list(keys),
        )
    )


async def delete_span_batch(con: asyncpg.Connection, span: Span, batch: int) -> int:
    """Delete up to ``batch`` rows of ``span``: messages first, then dialog states, inbox rows
    and their totals; 0 when none is left."""
    for table, key in (
        ("messages", "dialog_key"),
        ("dialog_state", "dialog_key"),
        ("inbox", "user_key"),
        ("inbox_totals", "user_key"),
    ):
        status = await con.execute(
            f"DELETE FROM {table} WHERE ctid IN (SELECT ctid FROM {table} WHERE {key} BETWEEN $1 AND $2 LIMIT $3)",
            span.lo,
            span.hi,
            batch,
        )
        if deleted := int(status.split()[-1]):
            return deleted
    return 0


async def analyze(con: asyncpg.Connection) -> None:
    """Fresh planner statistics for ``messages`` (after a bulk copy into it)."""
    await con.execute("ANALYZE messages")


async def message_count(con: asyncpg.Connection) -> int:
    """Messages on the shard, counted (``dialogs status``)."""
    return await con.fetchval("SELECT count(*) FROM messages")


# --- the inbox rows of moving user keys (docs/inbox.md, "Resharding") ------------------
# Inbox rows are values kept only when newer (apply_inbox), so copying one twice or late
# is harmless: the inbox's copy needs no checkpoint, only its catch-up log's watermark.


async def inbox_batch(
    con: asyncpg.Connection, span: Span, after: inbox.RowKey | None, limit: int
) -> list[inbox.InboxRow]:
    """Up to ``limit`` inbox rows of ``span`` past ``after``, in key order (the primary key's)."""
    lower = "(user_key, owner, peer) > ($3::bigint, $4::uuid, $5::uuid)" if after is not None else "TRUE"
    rows = await con.fetch(
        f"SELECT * FROM inbox WHERE user_key BETWEEN $1 AND $2 AND {lower}"
        f" ORDER BY user_key, owner, peer LIMIT ${6 if after is not None else 3}",
        span.lo,
        span.hi,
        *(after or ()),
        limit,
    )
    return [inbox.InboxRow.from_record(row) for row in rows]


async def read_inbox_delta(
    con: asyncpg.Connection, after: Watermark, limit: int, finished_only: bool = True
) -> tuple[list[inbox.InboxRow], Watermark | None]:
    """Inbox rows named by the log past ``after`` (as ``read_delta``), and the log's last
    position read (None: nothing past ``after``)."""
    horizon = f"AND d.xid < {_HORIZON}" if finished_only else ""
    rows = await con.fetch(
        f"""
        SELECT d.xid, d.seq, i.*
        FROM inbox_delta d
        JOIN inbox i USING (user_key, owner, peer)
        WHERE (d.xid, d.seq) > ($1, $2) {horizon}
        ORDER BY d.xid, d.seq LIMIT $3
        """,
        *after,
        limit,
    )
    return [inbox.InboxRow.from_record(row) for row in rows], (watermark_of(rows[-1]) if rows else None)


async def inbox_range_digests(con: asyncpg.Connection, spans: Sequence[Span]) -> Digests:
    """Per span (by its lo): rows and hash sum of its inbox rows and totals."""
    if not spans:
        return {}
    return _digests(
        await con.fetch(
            "SELECT lo, rows, checksum FROM inbox_range_digests($1::bigint[], $2::bigint[])",
            [s.lo for s in spans],
            [s.hi for s in spans],
        )
    )


async def inbox_key_digest(con: asyncpg.Connection, keys: Sequence[inbox.RowKey]) -> tuple[int, int]:
    """Rows and hash sum of the inbox rows ``keys`` and their owners' totals."""
    row = await con.fetchrow(
        "SELECT rows, checksum FROM inbox_key_digest($1::bigint[], $2::uuid[], $3::uuid[])",
        [k[0] for k in keys],
        [k[1] for k in keys],
        [k[2] for k in keys],
    )
    return row["rows"], int(row["checksum"])


async def inbox_delta_keys(con: asyncpg.Connection, after: Watermark) -> list[inbox.RowKey]:
    """The inbox rows logged past ``after``, finished or not."""
    rows = await con.fetch("SELECT DISTINCT user_key, owner, peer FROM inbox_delta WHERE (xid, seq) > ($1, $2)", *after)
    return [(row["user_key"], row["owner"], row["peer"]) for row in rows]


async def pending_announcements(con: asyncpg.Connection, spans: Sequence[Span]) -> list[asyncpg.Record]:
    """A source's outbox rows for dialogs of ``spans`` (which it no longer serves)."""
    if not spans:
        return []
    return await con.fetch(
        "SELECT o.seq, o.dialog_key, o.user_lo, o.user_hi FROM inbox_outbox o"
        " JOIN unnest($1::bigint[], $2::bigint[]) AS r(lo, hi) ON o.dialog_key BETWEEN r.lo AND r.hi",
        [s.lo for s in spans],
        [s.hi for s in spans],
    )


async def announce(con: asyncpg.Connection, dialogs: Sequence[asyncpg.Record]) -> None:
    """Put ``dialogs`` (dialog_key, user_lo, user_hi) in this shard's outbox."""
    await con.execute(
        "INSERT INTO inbox_outbox (dialog_key, user_lo, user_hi)"
        " SELECT * FROM unnest($1::bigint[], $2::uuid[], $3::uuid[]) ORDER BY 1, 2, 3",
        [d["dialog_key"] for d in dialogs],
        [d["user_lo"] for d in dialogs],
        [d["user_hi"] for d in dialogs],
    )


async def forget_announcements(con: asyncpg.Connection, seqs: Sequence[int]) -> None:
    await con.execute("DELETE FROM inbox_outbox WHERE seq = ANY($1::bigint[])", list(seqs))
