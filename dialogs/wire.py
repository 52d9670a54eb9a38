"""What travels between the proxy and the workers: paths, headers, message JSON."""

from __future__ import annotations

import datetime
import enum
import uuid
from typing import Any

REQUEST_ID_HEADER = "X-Request-ID"
MAP_VERSION_HEADER = "X-Map-Version"
IDEMPOTENCY_KEY_HEADER = "Idempotency-Key"

INTERNAL_MESSAGES_PATH = "/internal/v1/messages"  # GET: one page of a dialog
# Sends, many in one request: a JSON array of send items in, an array of results out (in
# the same order). Each item carries the map version it was routed with; each result is
# {"status": 200, "id", "created_at", "duplicate"} or an error body with its "status".
INTERNAL_BATCH_PATH = "/internal/v1/messages/batch"

# A page of a dialog holds at most this many bytes of message text (and at least one
# message): the whole page is held in memory by the worker and the proxy until the client
# has read it, so its size must not be the client's choice. 1,000 messages of 4,096
# four-byte characters would be 16 MiB; typical pages are far below the bound.
MAX_PAGE_TEXT_BYTES = 1 << 20


class Ownership(enum.StrEnum):
    """How a shard database serves a range of the ring (``shard_ranges.state``; the SQL CHECK
    in dialogs/schema/shard/ names the same set). docs/resharding.md has the table."""

    OWNED = "owned"  # reads and writes
    MIGRATING = "migrating"  # reads and writes, each write logged for the copy
    FROZEN = "frozen"  # reads; writes refused, on the cutover's lease
    LEAVING = "leaving"  # handed over: neither, on the same lease, until the flip
    INCOMING = "incoming"  # a copy target's: neither, until the flip


# Not a state: what set_range_states() is told to make a shard stop serving ranges (their rows go).
ABSENT = "absent"
READABLE = frozenset({Ownership.OWNED, Ownership.MIGRATING, Ownership.FROZEN})


class Phase(enum.StrEnum):
    """A resharding migration's phase: in the metadata database, the admin API and metrics.

    prepare -> copy -> catchup -> cutover -> cleanup -> done, or, before the flip,
    -> aborting -> aborted. A failed cutover goes back to catchup.
    """

    PREPARE = "prepare"
    COPY = "copy"
    CATCHUP = "catchup"
    CUTOVER = "cutover"
    CLEANUP = "cleanup"
    DONE = "done"
    ABORTING = "aborting"
    ABORTED = "aborted"

    @property
    def finished(self) -> bool:
        return self in _FINISHED

    @property
    def abortable(self) -> bool:
        """Before the flip: the old owners still hold everything."""
        return self in _ABORTABLE


_FINISHED = frozenset({Phase.DONE, Phase.ABORTED})
_ABORTABLE = frozenset({Phase.PREPARE, Phase.COPY, Phase.CATCHUP, Phase.CUTOVER})
FINISHED_PHASES = sorted(_FINISHED)
ABORTABLE_PHASES = sorted(_ABORTABLE)

# Notification channels in the metadata database.
MAP_CHANNEL = "dialogs_map"
WORKERS_CHANNEL = "dialogs_workers"


def message_json(
    message_id: int,
    from_user: uuid.UUID,
    to_user: uuid.UUID,
    text: str,
    created_at: datetime.datetime,
) -> dict[str, Any]:
    """One message as clients see it. Ids are strings: they exceed JavaScript's 2**53."""
    return {
        "id": str(message_id),
        "from": str(from_user),
        "to": str(to_user),
        "text": text,
        "created_at": created_at.isoformat(),
    }
