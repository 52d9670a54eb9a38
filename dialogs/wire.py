"""What travels between the proxy and the workers, defined once for both sides.

Two requests, authorised by the proxies' internal secret (``Authorization: Bearer``).
Each message carries the shard-map version it was routed with and the client's request
id as fields of its own, never as headers (a batch carries many):

    POST INTERNAL_BATCH_PATH          a JSON array of SendItem  ->  a JSON array, in the same
                                      order, of SendResult or an error, each with its "status"
    GET  INTERNAL_MESSAGES_PATH?<ListQuery>                   ->  200: a Page (the public
                                      messages' JSON array, its length in PAGE_COUNT_HEADER);
                                      otherwise an error
    POST INTERNAL_PAGES_PATH          a JSON array of ListQuery  ->  the pages, framed
                                      (``encode_pages``): one answer per query, in order
    POST INTERNAL_READ_PATH           a ReadMark  ->  200: a ReadResult (the mark now stored
                                      and the reader's unread count); otherwise an error
    GET  INTERNAL_INBOX_PATH?<InboxQuery>  ->  200: a Page (the public inbox items' JSON
                                      array, its length in PAGE_COUNT_HEADER); otherwise an error
    GET  INTERNAL_UNREAD_PATH?<InboxQuery> ->  200: the public {"total", "dialogs"}
    POST INTERNAL_INBOX_PAGES_PATH    a JSON array of InboxQuery  ->  the pages, framed as
                                      lists' are (``encode_pages``), one per query, in order
    POST INTERNAL_UNREAD_BATCH_PATH   a JSON array of InboxQuery  ->  a JSON array, in the
                                      same order, of {"status": 200, "total", "dialogs"} or
                                      an error
    POST INTERNAL_PAUSE_PATH          a WritePause  ->  200: {"drained": bool}: true once no
                                      commit is in flight, false if one still was after the
                                      worker's query timeout (a switchover's write pause)
    POST INTERNAL_RESUME_PATH         a WriteResume ->  200: {"paused": bool} (another
                                      holder's pause may stand)

Channels. A proxy may instead open a WebSocket on any of the four batch paths (a GET
with the same Authorization; a wrong secret is refused before the upgrade) and keep it:
each binary message it sends is one batch, the body it would POST, and each binary
message the worker sends back answers the batch before it (``channel_reply``: the status
and a newline, then the POST's answer for a 200, the error JSON otherwise). One batch at
a time per channel. A worker closes a channel with GOING_AWAY (1001) only when it has
answered every batch the channel carried; a batch that met that close was not carried
out (``dialog_api/channels.py``).

An error is the public error JSON (``errors.DialogsError.to_json``) with its ``retry_after``
when it has one (in the body of a batch item, in the Retry-After header of a response).
Both sides check with the rules of ``dialogs/checks.py`` (the public API's rules), so a
send the proxy accepts is one the worker accepts, and a bug on either side is a 400, not
a stored message the public API would have refused.

Adding a message: a frozen dataclass here with ``to_json``/``from_json`` (or
``to_query``/``from_query``), a round-trip test in tests/unit/test_wire.py, and the two
call sites: the proxy's forwarder and the worker's handler.
"""

from __future__ import annotations

import contextlib
import datetime
import enum
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import orjson

from dialogs import checks, errors
from dialogs.keys import INT64_MAX, dialog_key, user_key

REQUEST_ID_HEADER = "X-Request-ID"  # the public API's; on the wire, each message's request_id
IDEMPOTENCY_KEY_HEADER = "Idempotency-Key"
PAGE_COUNT_HEADER = "X-Page-Messages"

# The wire's version is in its paths: a proxy and a worker of different versions (a rolling
# upgrade) meet a 404 for the route, which the proxy takes as "this worker cannot serve
# it" (the next worker, then a 503), never as the client's 404.
WIRE_VERSION = 2
INTERNAL_MESSAGES_PATH = f"/internal/v{WIRE_VERSION}/messages"  # GET: one page of a dialog
INTERNAL_BATCH_PATH = f"/internal/v{WIRE_VERSION}/messages/batch"  # POST: many sends
INTERNAL_PAGES_PATH = f"/internal/v{WIRE_VERSION}/messages/pages"  # POST: many pages of dialogs
INTERNAL_READ_PATH = f"/internal/v{WIRE_VERSION}/dialogs/read"  # POST: a read mark
INTERNAL_INBOX_PATH = f"/internal/v{WIRE_VERSION}/inbox"  # GET: one page of a user's inbox
INTERNAL_UNREAD_PATH = f"/internal/v{WIRE_VERSION}/inbox/unread"  # GET: a user's unread totals
INTERNAL_INBOX_PAGES_PATH = f"/internal/v{WIRE_VERSION}/inbox/pages"  # POST: many inbox pages
INTERNAL_UNREAD_BATCH_PATH = f"/internal/v{WIRE_VERSION}/inbox/unread/batch"  # POST: many users' totals
INTERNAL_PAUSE_PATH = f"/internal/v{WIRE_VERSION}/writes/pause"  # POST: hold commits (switchover)
INTERNAL_RESUME_PATH = f"/internal/v{WIRE_VERSION}/writes/resume"  # POST: commit again
# The longest write pause a worker takes in one request (counted from its drain, or from
# the renewal): a switchover asks for 5 s and renews every second, so one whose caller
# died leaves the shard's sends refused no longer than that.
MAX_WRITE_PAUSE_SECONDS = 10.0

# One bound for every list, public and internal.
DEFAULT_LIST_LIMIT = 100
MAX_LIST_LIMIT = 1000
# No message text is longer, anywhere: the proxies' DIALOGS_MAX_TEXT_LENGTH may only lower it.
MAX_TEXT_LENGTH = 65536
# A request id longer than this, or not printable, is replaced by a fresh one.
MAX_REQUEST_ID_LENGTH = 128

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


# --- the proxy-worker messages --------------------------------------------------------------


def clean_request_id(value: Any) -> str:
    """A message's request id: the client's, or empty when it sent none we could keep."""
    if isinstance(value, str) and len(value) <= MAX_REQUEST_ID_LENGTH and value.isprintable():
        return value
    return ""


def _object(value: Any) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise errors.InvalidInput("body must be a JSON object")
    return value


def _holder(raw: Any) -> str:
    holder = _object(raw).get("holder")
    if not isinstance(holder, str) or not 0 < len(holder) <= MAX_REQUEST_ID_LENGTH or not holder.isprintable():
        raise errors.InvalidInput(f"holder must be a printable string of 1 to {MAX_REQUEST_ID_LENGTH} characters")
    return holder


@dataclass(frozen=True, slots=True)
class WritePause:
    """Pause a worker's commits for ``seconds`` (renewable) while a shard switches over.
    ``holder`` names the switchover: a worker stays paused while any holder's pause lasts."""

    holder: str
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {"holder": self.holder, "seconds": self.seconds}

    @classmethod
    def from_json(cls, raw: Any) -> WritePause:
        holder = _holder(raw)
        seconds = raw.get("seconds")
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, int | float)
            or not 0 < seconds <= MAX_WRITE_PAUSE_SECONDS
        ):
            raise errors.InvalidInput(f"seconds must be a number above 0 and at most {MAX_WRITE_PAUSE_SECONDS:g}")
        return cls(holder, float(seconds))


@dataclass(frozen=True, slots=True)
class WriteResume:
    """End one holder's pause."""

    holder: str

    def to_json(self) -> dict[str, Any]:
        return {"holder": self.holder}

    @classmethod
    def from_json(cls, raw: Any) -> WriteResume:
        return cls(_holder(raw))


@dataclass(frozen=True, slots=True)
class SendItem:
    """One send in a batch: the message, the map version it was routed with, the client's request id."""

    dialog_key: int
    from_user: uuid.UUID
    to_user: uuid.UUID
    text: str
    idempotency_key: str | None
    map_version: int | None  # None until the forwarder routes it
    request_id: str

    @property
    def routed_version(self) -> int:
        if self.map_version is None:
            raise ValueError("a send item is encoded only once routed (with its map version)")
        return self.map_version

    @property
    def route_key(self) -> int:
        return self.dialog_key

    def to_json(self) -> dict[str, Any]:
        return {
            "dialog_key": self.dialog_key,
            "from": str(self.from_user),
            "to": str(self.to_user),
            "text": self.text,
            "idempotency_key": self.idempotency_key,
            "map_version": self.routed_version,
            "request_id": self.request_id,
        }

    @classmethod
    def from_json(cls, raw: Any) -> SendItem:
        """Checked as the public API checks a send; the dialog key must be the pair's."""
        data = _object(raw)
        from_user = checks.user_id(data.get("from"), "from")
        to_user = checks.user_id(data.get("to"), "to")
        key = checks.json_int64(data.get("dialog_key"), "dialog_key")
        if key != dialog_key(from_user, to_user):
            raise errors.InvalidInput("dialog_key must be the dialog key of from and to")
        return cls(
            dialog_key=key,
            from_user=from_user,
            to_user=to_user,
            text=checks.text(data.get("text"), "text", MAX_TEXT_LENGTH),
            idempotency_key=checks.idempotency_key(data.get("idempotency_key"), "idempotency_key"),
            map_version=checks.json_int64(data.get("map_version"), "map_version"),
            request_id=clean_request_id(data.get("request_id")),
        )


@dataclass(frozen=True, slots=True)
class SendResult:
    """A stored send: its message id and time; ``duplicate`` when its Idempotency-Key had
    stored it before (the earlier message is the result)."""

    id: int
    created_at: str  # ISO 8601, as clients see it
    duplicate: bool

    def to_json(self) -> dict[str, Any]:
        return {"status": 200, "id": str(self.id), "created_at": self.created_at, "duplicate": self.duplicate}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SendResult:
        return cls(int(data["id"]), str(data["created_at"]), bool(data["duplicate"]))


def send_answer_from_json(raw: Any) -> SendResult | errors.DialogsError:
    """One item of a batch's answer: its result, or its error. Raises ValueError on
    anything else (the caller treats the batch as broken)."""
    if not isinstance(raw, dict):
        raise ValueError("a batch answer item must be a JSON object")
    status = raw.get("status")
    if status == 200:
        try:
            return SendResult.from_json(raw)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed send result: {exc!r}") from None
    if not isinstance(status, int):
        raise ValueError("a batch answer item needs its status")
    return error_from_json(status, raw)


@dataclass(frozen=True, slots=True)
class ListQuery:
    """One page of the dialog between ``viewer`` and ``other``: messages older than ``before``,
    newest first, at most ``limit`` (and at most MAX_PAGE_TEXT_BYTES of text)."""

    dialog_key: int
    viewer: uuid.UUID
    other: uuid.UUID
    before: int
    limit: int
    map_version: int | None  # None until the forwarder routes it
    request_id: str

    @property
    def routed_version(self) -> int:
        if self.map_version is None:
            raise ValueError("a list query is encoded only once routed (with its map version)")
        return self.map_version

    @property
    def route_key(self) -> int:
        return self.dialog_key

    def to_query(self) -> str:
        # By hand: urlencode() costs several times more, and only the request id needs quoting.
        return (
            f"dialog_key={self.dialog_key}&viewer={self.viewer}&other={self.other}&before={self.before}"
            f"&limit={self.limit}&map_version={self.routed_version}&request_id={quote(self.request_id, safe='')}"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "dialog_key": self.dialog_key,
            "viewer": str(self.viewer),
            "other": str(self.other),
            "before": self.before,
            "limit": self.limit,
            "map_version": self.routed_version,
            "request_id": self.request_id,
        }

    @classmethod
    def from_json(cls, raw: Any) -> ListQuery:
        """One query of a batch, checked as ``from_query`` checks one (numbers JSON-typed)."""
        return cls._checked(_object(raw), checks.json_int64)

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> ListQuery:
        return cls._checked(query, checks.int64)

    @classmethod
    def _checked(cls, data: Mapping[str, Any], integer: Callable[[Any, str], int]) -> ListQuery:
        viewer = checks.user_id(data.get("viewer"), "viewer")
        other = checks.user_id(data.get("other"), "other")
        key = integer(data.get("dialog_key"), "dialog_key")
        if key != dialog_key(viewer, other):
            raise errors.InvalidInput("dialog_key must be the dialog key of viewer and other")
        return cls(
            dialog_key=key,
            viewer=viewer,
            other=other,
            before=checks.bounded_int(integer(data.get("before", INT64_MAX), "before"), "before", 1, INT64_MAX),
            limit=checks.bounded_int(
                integer(data.get("limit", DEFAULT_LIST_LIMIT), "limit"), "limit", 1, MAX_LIST_LIMIT
            ),
            map_version=integer(data.get("map_version"), "map_version"),
            request_id=clean_request_id(data.get("request_id")),
        )


@dataclass(frozen=True, slots=True)
class InboxQuery:
    """One page of ``owner``'s inbox (conversations whose last message is older than
    ``before``, newest first, at most ``limit``), or its unread totals; routed by the
    owner's key (``keys.user_key``)."""

    user_key: int
    owner: uuid.UUID
    before: int
    limit: int
    map_version: int | None  # None until the forwarder routes it
    request_id: str

    @property
    def routed_version(self) -> int:
        if self.map_version is None:
            raise ValueError("an inbox query is encoded only once routed (with its map version)")
        return self.map_version

    def to_query(self) -> str:
        return (
            f"user_key={self.user_key}&owner={self.owner}&before={self.before}&limit={self.limit}"
            f"&map_version={self.routed_version}&request_id={quote(self.request_id, safe='')}"
        )

    @property
    def route_key(self) -> int:
        return self.user_key

    def to_json(self) -> dict[str, Any]:
        return {
            "user_key": self.user_key,
            "owner": str(self.owner),
            "before": self.before,
            "limit": self.limit,
            "map_version": self.routed_version,
            "request_id": self.request_id,
        }

    @classmethod
    def from_json(cls, raw: Any) -> InboxQuery:
        """One query of a batch, checked as ``from_query`` checks one (numbers JSON-typed)."""
        return cls._checked(_object(raw), checks.json_int64)

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> InboxQuery:
        return cls._checked(query, checks.int64)

    @classmethod
    def _checked(cls, data: Mapping[str, Any], integer: Callable[[Any, str], int]) -> InboxQuery:
        owner = checks.user_id(data.get("owner"), "owner")
        key = integer(data.get("user_key"), "user_key")
        if key != user_key(owner):
            raise errors.InvalidInput("user_key must be the key of owner")
        return cls(
            user_key=key,
            owner=owner,
            before=checks.bounded_int(integer(data.get("before", INT64_MAX), "before"), "before", 1, INT64_MAX),
            limit=checks.bounded_int(
                integer(data.get("limit", DEFAULT_LIST_LIMIT), "limit"), "limit", 1, MAX_LIST_LIMIT
            ),
            map_version=integer(data.get("map_version"), "map_version"),
            request_id=clean_request_id(data.get("request_id")),
        )


def inbox_item_json(
    peer: uuid.UUID,
    owner: uuid.UUID,
    last_id: int,
    last_from_owner: bool,
    text: str,
    created_at: datetime.datetime,
    unread: int,
) -> dict[str, Any]:
    """One conversation of a user's inbox as clients see it."""
    sender, recipient = (owner, peer) if last_from_owner else (peer, owner)
    return {
        "user_id": str(peer),
        "last_message": message_json(last_id, sender, recipient, text, created_at),
        "unread": unread,
    }


@dataclass(frozen=True, slots=True)
class UnreadTotals:
    """A user's badge: unread messages in all conversations, and conversations with any."""

    total: int
    dialogs: int

    def to_json(self) -> dict[str, Any]:
        return {"total": self.total, "dialogs": self.dialogs}

    @classmethod
    def from_json(cls, raw: Any) -> UnreadTotals:
        """Raises ValueError on anything else (the caller treats the answer as broken)."""
        if not isinstance(raw, dict) or not all(isinstance(raw.get(k), int) for k in ("total", "dialogs")):
            raise ValueError("unread totals need total and dialogs")
        return cls(raw["total"], raw["dialogs"])


def unread_answer_json(answer: UnreadTotals | dict[str, Any]) -> dict[str, Any]:
    """One item of a batch of unread totals' answer: the totals with their status, or an
    ``error_json``."""
    return {"status": 200, **answer.to_json()} if isinstance(answer, UnreadTotals) else answer


def decode_unread(body: bytes, count: int) -> list[UnreadTotals | errors.DialogsError]:
    """A batch of unread totals' answer read back: ``count`` answers. Raises ValueError on
    anything else (the caller treats the batch as broken)."""
    answers = orjson.loads(body)
    if not isinstance(answers, list) or len(answers) != count:
        raise ValueError("a batch of unread totals answers each query once")
    decoded: list[UnreadTotals | errors.DialogsError] = []
    for item in answers:
        if not isinstance(item, dict) or not isinstance(item.get("status"), int):
            raise ValueError("each answer of a batch of unread totals needs its status")
        decoded.append(UnreadTotals.from_json(item) if item["status"] == 200 else error_from_json(item["status"], item))
    return decoded


@dataclass(frozen=True, slots=True)
class ReadMark:
    """``reader`` has read the dialog with ``other`` up to message ``up_to`` (None: its newest)."""

    dialog_key: int
    reader: uuid.UUID
    other: uuid.UUID
    up_to: int | None
    map_version: int | None  # None until the forwarder routes it
    request_id: str

    @property
    def routed_version(self) -> int:
        if self.map_version is None:
            raise ValueError("a read mark is encoded only once routed (with its map version)")
        return self.map_version

    def to_json(self) -> dict[str, Any]:
        return {
            "dialog_key": self.dialog_key,
            "reader": str(self.reader),
            "other": str(self.other),
            "up_to": None if self.up_to is None else str(self.up_to),
            "map_version": self.routed_version,
            "request_id": self.request_id,
        }

    @classmethod
    def from_json(cls, raw: Any) -> ReadMark:
        data = _object(raw)
        reader = checks.user_id(data.get("reader"), "reader")
        other = checks.user_id(data.get("other"), "other")
        key = checks.json_int64(data.get("dialog_key"), "dialog_key")
        if key != dialog_key(reader, other):
            raise errors.InvalidInput("dialog_key must be the dialog key of reader and other")
        up_to = data.get("up_to")
        return cls(
            dialog_key=key,
            reader=reader,
            other=other,
            up_to=None if up_to is None else checks.message_id(up_to, "up_to"),
            map_version=checks.json_int64(data.get("map_version"), "map_version"),
            request_id=clean_request_id(data.get("request_id")),
        )


@dataclass(frozen=True, slots=True)
class ReadResult:
    """The reader's mark as stored (None: the dialog has no message yet) and its unread count."""

    up_to: int | None
    unread: int

    def to_json(self) -> dict[str, Any]:
        return {"up_to": None if self.up_to is None else str(self.up_to), "unread": self.unread}

    @classmethod
    def from_json(cls, raw: Any) -> ReadResult:
        """Raises ValueError on anything else (the caller treats the answer as broken)."""
        if not isinstance(raw, dict) or not isinstance(raw.get("unread"), int):
            raise ValueError("a read result needs its unread count")
        up_to = raw.get("up_to")
        if up_to is not None and not (isinstance(up_to, str) and up_to.isdigit()):
            raise ValueError("a read result's up_to must be a message id")
        return cls(None if up_to is None else int(up_to), raw["unread"])


@dataclass(frozen=True, slots=True)
class Page:
    """A page as the shard rendered it (the public JSON array, passed through as bytes by
    the worker and the proxy) and how many messages it holds."""

    body: bytes
    count: int

    @property
    def empty(self) -> bool:
        return self.count == 0

    @classmethod
    def from_response(cls, body: bytes, count_header: str | None) -> Page:
        """Raises ValueError when the count is missing or not a count."""
        if count_header is None or not count_header.isdigit():
            raise ValueError(f"a page needs its {PAGE_COUNT_HEADER} header")
        return cls(body, int(count_header))


def encode_pages(answers: list[Page | dict[str, Any]]) -> bytes:
    """The answer to a batch of list queries: one line of JSON, an array with one item per
    query (``{"status": 200, "count": n, "length": bytes}`` for a page, an ``error_json`` for
    an error), then the pages' bodies one after another. The pages travel as the worker
    encoded them: the proxy slices them out and passes them on without decoding them."""
    heads: list[dict[str, Any]] = []
    bodies: list[bytes] = []
    for answer in answers:
        if isinstance(answer, Page):
            heads.append({"status": 200, "count": answer.count, "length": len(answer.body)})
            bodies.append(answer.body)
        else:
            heads.append(answer)
    return b"".join((orjson.dumps(heads), b"\n", *bodies))


def decode_pages(body: bytes, count: int) -> list[Page | errors.DialogsError]:
    """``encode_pages`` read back: ``count`` answers. Raises ValueError on anything else (a
    broken answer: the caller treats the batch as broken)."""
    head, newline, rest = body.partition(b"\n")
    if not newline:
        raise ValueError("a batch of pages starts with a line of JSON")
    heads = orjson.loads(head)
    if not isinstance(heads, list) or len(heads) != count:
        raise ValueError("a batch of pages answers each query once")
    answers: list[Page | errors.DialogsError] = []
    offset = 0
    for item in heads:
        if not isinstance(item, dict) or not isinstance(item.get("status"), int):
            raise ValueError("each answer of a batch of pages needs its status")
        if item["status"] != 200:
            answers.append(error_from_json(item["status"], item))
            continue
        length, pages = item.get("length"), item.get("count")
        if not isinstance(length, int) or not isinstance(pages, int) or length < 0 or pages < 0:
            raise ValueError("a page's answer needs its count and length")
        if offset + length > len(rest):
            raise ValueError("a batch of pages ended early")
        answers.append(Page(rest[offset : offset + length], pages))
        offset += length
    if offset != len(rest):
        raise ValueError("a batch of pages has bytes past its last page")
    return answers


def channel_reply(status: int, body: bytes) -> bytes:
    """A worker's answer to one batch on a channel: its status line, then its body."""
    return b"%d\n%b" % (status, body)


def channel_answer(message: bytes) -> tuple[int, bytes]:
    """``channel_reply`` read back. Raises ValueError on anything else (a broken answer)."""
    head, newline, body = message.partition(b"\n")
    if not newline or not head.isdigit() or len(head) != 3:
        raise ValueError("a channel's answer starts with its status line")
    return int(head), body


def error_json(exc: errors.DialogsError, request_id: str) -> dict[str, Any]:
    """An error as one item of a batch's answer."""
    data = {"status": exc.status, **exc.to_json(request_id)}
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        data["retry_after"] = retry_after
    return data


def error_from_json(status: int, data: Mapping[str, Any], retry_after: str | None = None) -> errors.DialogsError:
    """The error a worker sent, rebuilt as the project's own (``retry_after``: a response's
    Retry-After header, when the error came as a whole response). Raises ValueError when
    ``data`` is not an error this wire defines."""
    if retry_after is not None and "retry_after" not in data:
        data = {**data, "retry_after": retry_after}
    try:
        return errors.from_json(status, data)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"malformed error from a worker: {exc!r}") from None


def error_from_response(status: int, body: bytes, retry_after: str | None) -> errors.DialogsError:
    """A worker's non-200 answer. A body that is not the worker's error JSON: 503 if it
    was a server error (a proxy in between, a worker dying), a bug otherwise."""
    try:
        data = orjson.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict):
        with contextlib.suppress(ValueError):
            return error_from_json(status, data, retry_after)
    return errors.ShardUnavailable() if status >= 500 else errors.DialogsError()
