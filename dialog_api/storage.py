"""All SQL on the shard database. asyncpg errors become the project's errors here only."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import asyncpg

from dialogs import errors, pg, schema, wire

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class NewMessage:
    dialog_key: int
    from_user: uuid.UUID
    to_user: uuid.UUID
    text: str
    idempotency_key: str | None

    @property
    def pair(self) -> tuple[uuid.UUID, uuid.UUID]:
        return ordered(self.from_user, self.to_user)

    @property
    def from_lo(self) -> bool:
        return self.from_user == self.pair[0]

    @property
    def identity(self) -> tuple[int, uuid.UUID, uuid.UUID, bool, str | None]:
        """What makes two sends the same send: dialog, sender and Idempotency-Key."""
        return (self.dialog_key, *self.pair, self.from_lo, self.idempotency_key)


@dataclass(frozen=True, slots=True)
class Stored:
    id: int
    created_at: datetime.datetime
    duplicate: bool


def translated() -> contextlib.AbstractAsyncContextManager[None]:
    """Shard database failures as 503s (``dialogs.pg``)."""
    return pg.translated(errors.ShardUnavailable)


_STORE = "SELECT ord, id, created_at, status FROM store_messages($1, $2, $3, $4, $5, $6)"

_MARK = "SELECT status, up_to, unread FROM mark_read($1, $2, $3, $4, $5)"

_EXISTING = """
SELECT m.dialog_key, m.user_lo, m.user_hi, m.from_lo, m.idempotency_key, m.id, m.created_at, m.text
FROM messages m
JOIN unnest($1::bigint[], $2::uuid[], $3::uuid[], $4::boolean[], $5::text[])
    AS k(dialog_key, user_lo, user_hi, from_lo, idempotency_key)
  USING (dialog_key, user_lo, user_hi, from_lo, idempotency_key)
"""

# Whether this shard serves the range holding key $1 (range_state() inlined: as plain SQL it
# is planned once with the prepared statement), and whether it may serve as the primary.
_OWN = f"""
WITH own AS (
    SELECT (SELECT effective_state(r.state, r.lease_until)
            FROM (SELECT hi, state, lease_until FROM shard_ranges WHERE lo <= $1 ORDER BY lo DESC LIMIT 1) AS r
            WHERE r.hi >= $1) AS state,
           {pg.PRIMARY_CHECK} AS primary_ok
)"""

# A message exactly as the public API shows it (dialogs/wire.py message_json, as orjson
# writes it): ids as strings, the sender and the recipient, the text escaped by
# PostgreSQL's JSON rules, created_at as Python's isoformat() writes a UTC time (no
# fraction when it is a whole second).
_MESSAGE_JSON = """
'{"id":"' || m.id || '","from":"' || CASE WHEN m.from_lo THEN m.user_lo ELSE m.user_hi END
|| '","to":"' || CASE WHEN m.from_lo THEN m.user_hi ELSE m.user_lo END
|| '","text":' || to_json(m.text)::text
|| ',"created_at":"' || to_char(m.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS')
|| CASE WHEN date_trunc('second', m.created_at) = m.created_at THEN ''
        ELSE to_char(m.created_at AT TIME ZONE 'UTC', '.US') END
|| '+00:00"}'
"""

# Many dialogs' pages in one statement (a proxy's batch of lists, or one list): per query
# ($1 keys, $2/$3 the pair, $4 before, $5 limits, in order), whether this shard serves its
# range, and its page as the public JSON array, built here so that the worker passes it
# on without decoding a row. A page holds at most $6 bytes of text, and always its first
# message: octet_length reads a stored text's size without detoasting it. Whether the
# server may serve as the primary is asked once (pg.PRIMARY_CHECK).
LIST_PAGES_QUERY = f"""
WITH q AS MATERIALIZED (
    SELECT q.*,
           (SELECT effective_state(r.state, r.lease_until)
            FROM (SELECT hi, state, lease_until FROM shard_ranges
                  WHERE lo <= q.dialog_key ORDER BY lo DESC LIMIT 1) AS r
            WHERE r.hi >= q.dialog_key) AS state
    FROM unnest($1::bigint[], $2::uuid[], $3::uuid[], $4::bigint[], $5::integer[])
        WITH ORDINALITY AS q(dialog_key, user_lo, user_hi, before, lim, i)
), server AS (
    SELECT {pg.PRIMARY_CHECK} AS primary_ok
)
SELECT q.i, q.state, server.primary_ok, page.body, page.n
FROM q CROSS JOIN server
LEFT JOIN LATERAL (
    SELECT convert_to('[' || coalesce(string_agg({_MESSAGE_JSON}, ',' ORDER BY m.id DESC), '') || ']', 'UTF8') AS body,
           count(*) AS n
    FROM (
        SELECT id, user_lo, user_hi, from_lo, text, created_at
        FROM (
            SELECT id, user_lo, user_hi, from_lo, text, created_at,
                   sum(octet_length(text)) OVER newest_first AS bytes, row_number() OVER newest_first AS n
            FROM messages
            WHERE dialog_key = q.dialog_key AND user_lo = q.user_lo AND user_hi = q.user_hi AND id < q.before
            WINDOW newest_first AS (ORDER BY id DESC ROWS UNBOUNDED PRECEDING)
            ORDER BY id DESC
            LIMIT q.lim
        ) AS candidates
        WHERE bytes <= $6 OR n = 1
    ) AS m
) AS page ON q.state IN ('owned', 'migrating', 'frozen') AND server.primary_ok
ORDER BY q.i
"""


# Queries one list statement takes: a proxy's batch may hold 256, each page up to 1 MiB of
# text, and one statement is one backend's work under one query timeout.
LIST_STATEMENT_QUERIES = 32


# A page of an owner's inbox behind the same check, by the owner's key: the conversations
# whose last message is older than $3, newest first, at most $4 and at most $5 bytes of
# text (always the first).
INBOX_QUERY = f"""{_OWN}
SELECT own.state, own.primary_ok, page.*
FROM own LEFT JOIN LATERAL (
    SELECT peer, last_id, last_from_owner, last_text, last_at, unread
    FROM (
        SELECT peer, last_id, last_from_owner, last_text, last_at, unread,
               sum(octet_length(last_text)) OVER newest_first AS bytes, row_number() OVER newest_first AS n
        FROM inbox
        WHERE user_key = $1 AND owner = $2 AND last_id < $3
        WINDOW newest_first AS (ORDER BY last_id DESC ROWS UNBOUNDED PRECEDING)
        ORDER BY last_id DESC
        LIMIT $4
    ) AS candidates
    WHERE bytes <= $5 OR n = 1
    ORDER BY last_id DESC
) AS page ON own.state IN ('owned', 'migrating', 'frozen') AND own.primary_ok
"""

UNREAD_QUERY = f"""{_OWN}
SELECT own.state, own.primary_ok, t.unread, t.dialogs
FROM own LEFT JOIN inbox_totals t
    ON t.user_key = $1 AND t.owner = $2 AND own.state IN ('owned', 'migrating', 'frozen') AND own.primary_ok
"""


_STATUS = {
    "inserted": lambda row: Stored(row["id"], row["created_at"], duplicate=False),
    "duplicate": lambda row: None,  # filled in by _resolve_repeats
    "frozen": lambda row: errors.RangeMoving(),
    "not_served": lambda row: errors.RangeNotServed(),
}


def ordered(user_a: uuid.UUID, user_b: uuid.UUID) -> tuple[uuid.UUID, uuid.UUID]:
    """The pair as stored: (user_lo, user_hi). UUIDs order the same in Python and PostgreSQL."""
    return (user_a, user_b) if user_a <= user_b else (user_b, user_a)


class ShardStore:
    def __init__(
        self,
        pool: asyncpg.Pool,
        observe: Callable[[str, float], None] = lambda query, seconds: None,
        acquire_timeout: float | None = None,
    ) -> None:
        self.pool = pool
        self._observe = observe
        self._acquire_timeout = acquire_timeout

    def _connection(self) -> contextlib.AbstractAsyncContextManager[asyncpg.Connection]:
        return pg.pooled(self.pool, self._acquire_timeout)

    async def insert_batch(self, batch: Sequence[NewMessage]) -> list[Stored | errors.DialogsError]:
        """Store a batch in one transaction (one commit, one WAL flush for all of them).

        Each result is the stored message, or the error for that send alone (a reused
        Idempotency-Key, a range that is frozen or not served here); the others in the
        batch are unaffected.
        """
        # A failure to get a connection wrote nothing: another worker may try (503 ShardUnavailable).
        # Once the statement is sent, a failure may come after the commit (SendOutcomeUnknown).
        async with translated(), self._connection() as con, pg.translated(errors.SendOutcomeUnknown):
            started = time.perf_counter()
            rows = await con.fetch(
                _STORE,
                [m.dialog_key for m in batch],
                [m.pair[0] for m in batch],
                [m.pair[1] for m in batch],
                [m.from_lo for m in batch],
                [m.text for m in batch],
                [m.idempotency_key for m in batch],
            )
            self._observe("store", time.perf_counter() - started)
            results: list[Stored | errors.DialogsError | None] = [_STATUS[row["status"]](row) for row in rows]
            repeated = [index for index, row in enumerate(rows) if row["status"] == "duplicate"]
            if repeated:
                await self._resolve_repeats(con, batch, repeated, results)
        answered = [result for result in results if result is not None]
        if len(answered) != len(batch):  # a duplicate whose stored row was not found: a bug, never a guess
            raise RuntimeError("store_messages reported a duplicate that is not stored")
        return answered

    async def _resolve_repeats(
        self,
        con: asyncpg.Connection,
        batch: Sequence[NewMessage],
        repeated: list[int],
        results: list[Stored | errors.DialogsError | None],
    ) -> None:
        identities = [batch[i].identity for i in repeated]
        columns = list(zip(*identities, strict=True))
        existing = {
            (row["dialog_key"], row["user_lo"], row["user_hi"], row["from_lo"], row["idempotency_key"]): row
            for row in await con.fetch(_EXISTING, *columns)
        }
        for index in repeated:
            message = batch[index]
            row = existing[message.identity]
            if row["text"] != message.text:
                results[index] = errors.IdempotencyKeyReused()
            else:
                results[index] = Stored(row["id"], row["created_at"], duplicate=True)

    async def list_pages(self, queries: Sequence[wire.ListQuery]) -> list[wire.Page | errors.DialogsError]:
        """Each query's page (or RangeNotServed), at most LIST_STATEMENT_QUERIES to a
        statement, the statements at once. A server that may not serve as the primary
        refuses them all (ShardUnavailable)."""
        if len(queries) <= LIST_STATEMENT_QUERIES:
            return await self._list_statement(queries)
        parts = await asyncio.gather(
            *(
                self._list_statement(queries[start : start + LIST_STATEMENT_QUERIES])
                for start in range(0, len(queries), LIST_STATEMENT_QUERIES)
            )
        )
        return [page for part in parts for page in part]

    async def _list_statement(self, queries: Sequence[wire.ListQuery]) -> list[wire.Page | errors.DialogsError]:
        keys, lows, highs, befores, limits = [], [], [], [], []
        for query in queries:
            low, high = ordered(query.viewer, query.other)
            keys.append(query.dialog_key)
            lows.append(low)
            highs.append(high)
            befores.append(query.before)
            limits.append(query.limit)
        rows = await self._fetch_served(
            "list", LIST_PAGES_QUERY, keys, lows, highs, befores, limits, wire.MAX_PAGE_TEXT_BYTES
        )
        return [
            wire.Page(row["body"], row["n"]) if row["state"] in wire.READABLE else errors.RangeNotServed()
            for row in rows
        ]

    async def inbox_page(self, query: wire.InboxQuery) -> list[asyncpg.Record]:
        """One page of a user's inbox, from the shard that owns the user's key."""
        rows = await self._served_read(
            "inbox", INBOX_QUERY, query.user_key, query.owner, query.before, query.limit, wire.MAX_PAGE_TEXT_BYTES
        )
        return [row for row in rows if row["last_id"] is not None]

    async def unread_totals(self, query: wire.InboxQuery) -> wire.UnreadTotals:
        row = (await self._served_read("unread", UNREAD_QUERY, query.user_key, query.owner))[0]
        return wire.UnreadTotals(row["unread"] or 0, row["dialogs"] or 0)

    async def _served_read(self, name: str, sql: str, *args: object) -> list[asyncpg.Record]:
        """A read behind the ownership check (``_OWN``): its rows, or the refusal."""
        rows = await self._fetch_served(name, sql, *args)
        if rows[0]["state"] not in wire.READABLE:
            raise errors.RangeNotServed()
        return rows

    async def _fetch_served(self, name: str, sql: str, *args: object) -> list[asyncpg.Record]:
        """The rows of a read that also asks whether this server may serve as the primary
        (a ``primary_ok`` column); ShardUnavailable when it may not."""
        async with translated(), self._connection() as con:
            started = time.perf_counter()
            rows = await con.fetch(sql, *args)
            self._observe(name, time.perf_counter() - started)
            if rows and not rows[0]["primary_ok"]:
                # A demoted or stale primary of a replicated shard (pg.PRIMARY_CHECK): this
                # connection is dropped, and the next one goes to the group's primary.
                raise errors.ShardUnavailable("the shard's primary is changing; retry shortly")
        return rows

    async def mark_read(
        self, dialog_key: int, reader: uuid.UUID, other: uuid.UUID, up_to: int | None
    ) -> wire.ReadResult:
        """Move ``reader``'s read mark forward to ``up_to`` (None: the newest message); the
        mark now stored and the unread count. A write like a send (behind the fence, refused
        while the range is frozen); applying the same mark twice is applying it once."""
        user_lo, user_hi = ordered(reader, other)
        # Nothing of a failed mark matters: a repeat is the same mark (repeatable), so any
        # failure is a plain 503 the proxy may retry.
        async with translated(), self._connection() as con:
            started = time.perf_counter()
            try:
                row = await con.fetchrow(_MARK, dialog_key, user_lo, user_hi, reader == user_lo, up_to)
            except asyncpg.ReadOnlySQLTransactionError:  # a primary just demoted: its successor will take it
                raise errors.ShardUnavailable("the shard's primary is changing; retry shortly") from None
            self._observe("mark_read", time.perf_counter() - started)
        status = row["status"]
        if status == "marked":
            return wire.ReadResult(row["up_to"], row["unread"])
        if status == "no_message":
            raise errors.MessageNotFound(f"message {up_to} is not in this dialog")
        if status == "frozen":
            raise errors.RangeMoving()
        raise errors.RangeNotServed()

    async def rows_estimate(self) -> int:
        """The planner's row count for messages: free to read, close enough for a dashboard."""
        async with translated(), self._connection() as con:
            return await con.fetchval(
                "SELECT greatest(reltuples, 0)::bigint FROM pg_class WHERE oid = 'messages'::regclass"
            )

    async def ping(self) -> None:
        async with translated(), self._connection() as con:
            await con.fetchval("SELECT 1")


async def upgrade_schema(dsn: str, patience: float = 60.0, until: int | None = None) -> list[str]:
    """Bring the shard's schema up to date; the names of the files applied now.

    A shard server still starting (compose starts a stack's containers together, a
    restarted server recovers) is waited for, up to ``patience`` seconds.
    """
    deadline = time.monotonic() + patience
    while True:
        try:
            con = await pg.connect(dsn, timeout=5)
            break
        except pg.UNAVAILABLE as exc:
            if time.monotonic() >= deadline:
                raise
            log.warning("shard database not reachable yet, retrying: %s", exc)
            await asyncio.sleep(1.0)
    try:
        return await schema.upgrade_shard(con, until)
    finally:
        await con.close()
