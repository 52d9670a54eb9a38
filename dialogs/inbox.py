"""The inbox projection (docs/inbox.md), shared by the workers' applier, the migration
runner and `dialogs inbox verify`: what a dialog's snapshot projects into its users'
inboxes, and the SQL that reads snapshots and applies inbox rows.

A snapshot is read on the dialog's shard in one statement (its state and its newest
message: one snapshot of both), and projects to one inbox row per user: the other user,
the last message, the user's unread count, and the state's version. Rows are values, kept
only when newer (``apply_inbox``, shard schema 0007 and 0008), so applying one twice, late, or
from two places is harmless.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

from dialogs.keys import user_key

# Each dialog announced by the outbox's first ``$2`` rows past seq ``$1``, with those rows'
# seqs, whether this shard still serves the dialog (a dialog that moved away has its
# announcements handed to its new shard by the migration's cleanup: see the runner), and
# its snapshot (NULL state: the dialog is no longer here).
SNAPSHOTS_FROM_OUTBOX = """
WITH batch AS MATERIALIZED (
    SELECT seq, dialog_key, user_lo, user_hi FROM inbox_outbox WHERE seq > $1 ORDER BY seq LIMIT $2
), announced AS (
    SELECT dialog_key, user_lo, user_hi, array_agg(seq) AS seqs FROM batch GROUP BY 1, 2, 3
)
SELECT a.seqs, a.dialog_key, a.user_lo, a.user_hi, range_state(a.dialog_key) IS NOT NULL AS served,
       s.version, s.sent_lo, s.sent_hi, s.read_count_lo,
       s.read_count_hi, m.id AS last_id, m.from_lo AS last_from_lo, m.text AS last_text, m.created_at AS last_at
FROM announced a
LEFT JOIN dialog_state s USING (dialog_key, user_lo, user_hi)
LEFT JOIN LATERAL (
    SELECT id, from_lo, text, created_at FROM messages
    WHERE dialog_key = a.dialog_key AND user_lo = a.user_lo AND user_hi = a.user_hi
    ORDER BY id DESC LIMIT 1
) AS m ON s.version IS NOT NULL
"""

# Every dialog this shard serves, with its snapshot: what the inboxes must hold (verify).
SERVED_SNAPSHOTS = """
SELECT s.dialog_key, s.user_lo, s.user_hi, s.version, s.sent_lo, s.sent_hi, s.read_count_lo, s.read_count_hi,
       m.id AS last_id, m.from_lo AS last_from_lo, m.text AS last_text, m.created_at AS last_at
FROM dialog_state s
CROSS JOIN LATERAL (
    SELECT id, from_lo, text, created_at FROM messages
    WHERE dialog_key = s.dialog_key AND user_lo = s.user_lo AND user_hi = s.user_hi
    ORDER BY id DESC LIMIT 1
) AS m
WHERE range_state(s.dialog_key) IN ('owned', 'migrating', 'frozen')
"""

APPLY = "SELECT user_key, owner, peer, status FROM apply_inbox($1::jsonb, $2)"

INBOX_COLUMNS = ("user_key", "owner", "peer", "version", "last_id", "last_from_owner", "last_text", "last_at", "unread")

# The applier's lease on a shard's outbox, one worker of the shard at a time: the advisory
# lock (APPLIER_LOCK_CLASS, hashtext(current_schema())), so shards placed as schemas of one
# database (as the tests place them) each have theirs.
APPLIER_LOCK_CLASS = 0x696E626F  # "inbo"
TAKE_APPLIER_LOCK = "SELECT pg_try_advisory_lock($1, hashtext(current_schema()))"


@dataclass(frozen=True, slots=True)
class InboxRow:
    user_key: int
    owner: uuid.UUID
    peer: uuid.UUID
    version: int
    last_id: int
    last_from_owner: bool
    last_text: str
    last_at: Any  # datetime from the database; compared, never computed with
    unread: int

    def to_json(self) -> dict[str, Any]:
        return {
            "user_key": self.user_key,
            "owner": str(self.owner),
            "peer": str(self.peer),
            "version": self.version,
            "last_id": self.last_id,
            "last_from_owner": self.last_from_owner,
            "last_text": self.last_text,
            "last_at": self.last_at.isoformat(),
            "unread": self.unread,
        }

    @classmethod
    def from_record(cls, row: asyncpg.Record) -> InboxRow:
        return cls(*(row[c] for c in INBOX_COLUMNS))


def project(snapshot: asyncpg.Record) -> list[InboxRow]:
    """The inbox rows a dialog's snapshot makes: one per user (one for a dialog with oneself,
    where nothing is unread). Nothing for a dialog no longer on the shard."""
    if snapshot["version"] is None or snapshot["last_id"] is None:
        return []
    lo, hi, from_lo = snapshot["user_lo"], snapshot["user_hi"], snapshot["last_from_lo"]
    common = (snapshot["version"], snapshot["last_id"])
    text, at = snapshot["last_text"], snapshot["last_at"]
    if lo == hi:
        return [InboxRow(user_key(lo), lo, hi, *common, True, text, at, 0)]
    return [
        InboxRow(user_key(lo), lo, hi, *common, from_lo, text, at, snapshot["sent_hi"] - snapshot["read_count_lo"]),
        InboxRow(user_key(hi), hi, lo, *common, not from_lo, text, at, snapshot["sent_lo"] - snapshot["read_count_hi"]),
    ]


def rows_json(rows: Sequence[InboxRow]) -> str:
    return orjson.dumps([row.to_json() for row in rows]).decode()


RowKey = tuple[int, uuid.UUID, uuid.UUID]  # (user_key, owner, peer)


async def apply(con: asyncpg.Connection, rows: Sequence[InboxRow], copy: bool = False) -> dict[RowKey, str]:
    """Apply ``rows`` on an owner's shard; each row's status by (user_key, owner, peer):
    applied (or superseded by a newer row), frozen, not_served (``apply_inbox``)."""
    if not rows:
        return {}
    answered = await con.fetch(APPLY, rows_json(rows), copy)
    return {(r["user_key"], r["owner"], r["peer"]): r["status"] for r in answered}
