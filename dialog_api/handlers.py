"""The worker's internal API: parse, call, respond. Only proxies call it."""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from dialog_api.appkeys import CHANNELS, GROUP_COMMIT, INBOX_READS, MAP_VIEW, METRICS, SETTINGS, STORE
from dialog_api.channels import BatchAnswer
from dialog_api.storage import NewMessage, ShardStore, Stored
from dialogs import errors, wire
from dialogs.http import bearer_token, json_response, read_body, read_json, rename_request, request_id_of

log = logging.getLogger(__name__)


def _require_proxy(request: web.Request) -> None:
    """The internal API trusts its caller's ``from``: only proxies, holding the secret, may call."""
    token = bearer_token(request, missing="the internal API needs the proxies' internal secret")
    if not hmac.compare_digest(token.encode(), request.app[SETTINGS].internal_secret.encode()):
        raise errors.Unauthorized("wrong internal secret")


def _new_message(item: wire.SendItem) -> NewMessage:
    return NewMessage(item.dialog_key, item.from_user, item.to_user, item.text, item.idempotency_key)


def _result(stored: Stored) -> wire.SendResult:
    return wire.SendResult(stored.id, stored.created_at.isoformat(), stored.duplicate)


async def store_sends(app: web.Application, body: bytes, batch_request_id: str) -> bytes:
    """A batch of sends, each checked and answered on its own (``dialogs/wire.py``)."""
    batch = await _routed_batch(app, body, batch_request_id, wire.SendItem.from_json)
    committer = app[GROUP_COMMIT]
    # Queued together, before any commit starts: one group commit takes them all.
    futures = committer.submit_many([_new_message(item) for _, item in batch.accepted])
    for (index, _), future in zip(batch.accepted, futures, strict=True):
        try:
            batch.answers[index] = _result(await future).to_json()
        except errors.DialogsError as exc:
            batch.answers[index] = wire.error_json(exc, batch.request_ids[index])
    if log.isEnabledFor(logging.DEBUG):  # each send keeps the client's request id in the worker's log
        for request_id, answer in zip(batch.request_ids, batch.answers, strict=True):
            status = answer["status"] if isinstance(answer, dict) else None
            log.debug("send in batch %s", status, extra={"request_id": request_id, "status": status})
    return orjson.dumps(batch.answers)


Routed = TypeVar("Routed", wire.SendItem, wire.ListQuery, wire.InboxQuery)
Result = TypeVar("Result")


@dataclass
class _Batch(Generic[Routed]):
    """A batch's items: those accepted, by their index, and an answer slot per item (already
    filled with the error of an item that was malformed or routed by a stale map)."""

    request_ids: list[str]
    answers: list[Any]
    accepted: list[tuple[int, Routed]]


async def _routed_batch(
    app: web.Application, body: bytes, batch_request_id: str, parse: Callable[[Any], Routed]
) -> _Batch[Routed]:
    """A proxy's batch (a non-empty JSON array), each item parsed and its route checked on
    its own. A proxy routes a batch by one map: at most one reload, however many items name it."""
    if not body:
        raise errors.InvalidInput("request body must be JSON")
    try:
        raw_items = orjson.loads(body)
    except ValueError:
        raise errors.InvalidInput("request body is not valid JSON") from None
    if not isinstance(raw_items, list) or not raw_items:
        raise errors.InvalidInput("body must be a non-empty JSON array")
    view = app[MAP_VIEW]
    batch: _Batch[Routed] = _Batch(
        [_item_request_id(raw, batch_request_id) for raw in raw_items], [None] * len(raw_items), []
    )
    parsed: list[tuple[int, Routed]] = []
    for index, raw in enumerate(raw_items):
        try:
            parsed.append((index, parse(raw)))
        except errors.DialogsError as exc:
            batch.answers[index] = wire.error_json(exc, batch.request_ids[index])
    if parsed:
        await view.catch_up(max(item.routed_version for _, item in parsed))
    for index, item in parsed:
        try:
            view.check_loaded_route(item.route_key, item.routed_version)
            batch.accepted.append((index, item))
        except errors.DialogsError as exc:
            batch.answers[index] = wire.error_json(exc, batch.request_ids[index])
    return batch


def _item_request_id(raw: object, batch_request_id: str) -> str:
    """An item's request id by the wire's rule, also for an item too malformed to parse;
    the batch's own if it has none."""
    own = wire.clean_request_id(raw.get("request_id")) if isinstance(raw, dict) else ""
    return own or batch_request_id


async def list_messages(request: web.Request) -> web.Response:
    request_id = wire.clean_request_id(request.query.get("request_id"))
    if request_id:
        rename_request(request, request_id)  # also for a list refused below
    _require_proxy(request)
    query = wire.ListQuery.from_query(request.query)
    await request.app[MAP_VIEW].check_route(query.dialog_key, query.routed_version)
    (page,) = await request.app[STORE].list_pages([query])
    if isinstance(page, errors.DialogsError):
        raise page
    return web.Response(
        body=page.body, content_type="application/json", headers={wire.PAGE_COUNT_HEADER: str(page.count)}
    )


async def read_pages(app: web.Application, body: bytes, batch_request_id: str) -> bytes:
    """A batch of list queries, each checked and answered on its own (``dialogs/wire.py``):
    as ``store_sends`` is for sends. One statement reads every accepted query's page; a
    range this shard does not serve is that query's error."""
    batch = await _routed_batch(app, body, batch_request_id, wire.ListQuery.from_json)
    if batch.accepted:
        pages = await app[STORE].list_pages([query for _, query in batch.accepted])
        for (index, _), page in zip(batch.accepted, pages, strict=True):
            if isinstance(page, errors.DialogsError):
                batch.answers[index] = wire.error_json(page, batch.request_ids[index])
            else:
                batch.answers[index] = page
    return wire.encode_pages(batch.answers)


async def read_inbox_pages(app: web.Application, body: bytes, batch_request_id: str) -> bytes:
    """A batch of inbox pages, each checked and answered on its own, framed as lists' are."""
    batch = await _routed_batch(app, body, batch_request_id, wire.InboxQuery.from_json)
    store = app[STORE]
    await _answer_each(app, batch, lambda query: _inbox_page(store, query), lambda page: page)
    return wire.encode_pages(batch.answers)


async def read_unread_totals(app: web.Application, body: bytes, batch_request_id: str) -> bytes:
    """A batch of users' unread totals, each checked and answered on its own."""
    batch = await _routed_batch(app, body, batch_request_id, wire.InboxQuery.from_json)
    await _answer_each(app, batch, app[STORE].unread_totals, wire.unread_answer_json)
    return orjson.dumps(batch.answers)


async def _answer_each(
    app: web.Application,
    batch: _Batch[wire.InboxQuery],
    read: Callable[[wire.InboxQuery], Awaitable[Result]],
    answer: Callable[[Result], Any],
) -> None:
    """Each accepted query read and answered on its own, or its error, all at once but at
    most ``INBOX_READS`` reads of the whole worker on the pool at a time (app.py). An error
    that is not the project's (a bug) is that query's 500, logged under its request id; the
    other queries of the batch are answered all the same."""
    reads = app[INBOX_READS]

    async def one(index: int, query: wire.InboxQuery) -> None:
        request_id = batch.request_ids[index]
        try:
            async with reads:
                result = await read(query)
            batch.answers[index] = answer(result)
        except errors.DialogsError as exc:
            batch.answers[index] = wire.error_json(exc, request_id)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the batch is cancelled: it goes with its queries
            log.error("a read was cancelled from within", exc_info=True, extra={"request_id": request_id})
            batch.answers[index] = wire.error_json(errors.DialogsError(), request_id)
        except Exception:
            log.exception("unhandled error", extra={"request_id": request_id})
            batch.answers[index] = wire.error_json(errors.DialogsError(), request_id)

    await asyncio.gather(*(one(index, query) for index, query in batch.accepted))


def _batch_post(answer: BatchAnswer, content_type: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """A batch path's POST: one batch in one request (a channel carries the same body)."""

    async def post_batch(request: web.Request) -> web.StreamResponse:
        _require_proxy(request)
        body = await read_body(request)
        return web.Response(body=await answer(request.app, body, request_id_of(request)), content_type=content_type)

    return post_batch


def _channel(answer: BatchAnswer, route: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """A batch path's GET: the proxy's persistent channel for that path (``channels.py``)."""

    async def open_channel(request: web.Request) -> web.StreamResponse:
        _require_proxy(request)  # before the upgrade: a wrong secret is a plain 401
        return await request.app[CHANNELS].serve(request, answer, route)

    return open_channel


async def inbox_page(request: web.Request) -> web.Response:
    query = await _inbox_query(request)
    page = await _inbox_page(request.app[STORE], query)
    return web.Response(
        body=page.body, content_type="application/json", headers={wire.PAGE_COUNT_HEADER: str(page.count)}
    )


async def _inbox_page(store: ShardStore, query: wire.InboxQuery) -> wire.Page:
    rows = await store.inbox_page(query)
    items = [
        wire.inbox_item_json(
            row["peer"],
            query.owner,
            row["last_id"],
            row["last_from_owner"],
            row["last_text"],
            row["last_at"],
            row["unread"],
        )
        for row in rows
    ]
    return wire.Page(orjson.dumps(items), len(rows))


async def unread_totals(request: web.Request) -> web.Response:
    query = await _inbox_query(request)
    return json_response((await request.app[STORE].unread_totals(query)).to_json())


async def _inbox_query(request: web.Request) -> wire.InboxQuery:
    request_id = wire.clean_request_id(request.query.get("request_id"))
    if request_id:
        rename_request(request, request_id)
    _require_proxy(request)
    query = wire.InboxQuery.from_query(request.query)
    await request.app[MAP_VIEW].check_route(query.user_key, query.routed_version)
    return query


async def mark_read(request: web.Request) -> web.Response:
    _require_proxy(request)
    mark = wire.ReadMark.from_json(await read_json(request, orjson.loads))
    if mark.request_id:
        rename_request(request, mark.request_id)
    await request.app[MAP_VIEW].check_route(mark.dialog_key, mark.routed_version)
    result = await request.app[STORE].mark_read(mark.dialog_key, mark.reader, mark.other, mark.up_to)
    return json_response(result.to_json())


async def pause_writes(request: web.Request) -> web.Response:
    """Hold this worker's commits for a switchover of the shard's primary; answers once the
    commits in flight are done, or after the query timeout with ``drained`` false."""
    _require_proxy(request)
    pause = wire.WritePause.from_json(await read_json(request, orjson.loads))
    committer = request.app[GROUP_COMMIT]
    was_paused = committer.paused
    drained = await committer.pause(pause.holder, pause.seconds, drain_timeout=request.app[SETTINGS].query_timeout)
    if not was_paused:
        log.info("writes paused for a switchover (%s); in-flight commits drained: %s", pause.holder, drained)
    return json_response({"drained": drained})


async def resume_writes(request: web.Request) -> web.Response:
    _require_proxy(request)
    resume = wire.WriteResume.from_json(await read_json(request, orjson.loads))
    committer = request.app[GROUP_COMMIT]
    committer.resume(resume.holder)
    log.info("writes resumed after a switchover (%s)%s", resume.holder, "; another pause stands" * committer.paused)
    return json_response({"paused": committer.paused})


async def health(request: web.Request) -> web.Response:
    view = request.app[MAP_VIEW]
    await request.app[STORE].ping()
    return json_response({"status": "ok", "shard_id": request.app[SETTINGS].shard_id, "map_version": view.map_version})


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


# Each batch path: what answers its batches, and the content type of a POST's answer.
BATCHES: tuple[tuple[str, BatchAnswer, str], ...] = (
    (wire.INTERNAL_BATCH_PATH, store_sends, "application/json"),
    (wire.INTERNAL_PAGES_PATH, read_pages, "application/octet-stream"),
    (wire.INTERNAL_INBOX_PAGES_PATH, read_inbox_pages, "application/octet-stream"),
    (wire.INTERNAL_UNREAD_BATCH_PATH, read_unread_totals, "application/json"),
)


def setup_routes(app: web.Application) -> None:
    for path, answer, content_type in BATCHES:
        app.router.add_post(path, _batch_post(answer, content_type))
        app.router.add_get(path, _channel(answer, path))
    app.router.add_get(wire.INTERNAL_MESSAGES_PATH, list_messages)
    app.router.add_post(wire.INTERNAL_READ_PATH, mark_read)
    app.router.add_get(wire.INTERNAL_INBOX_PATH, inbox_page)
    app.router.add_get(wire.INTERNAL_UNREAD_PATH, unread_totals)
    app.router.add_post(wire.INTERNAL_PAUSE_PATH, pause_writes)
    app.router.add_post(wire.INTERNAL_RESUME_PATH, resume_writes)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
