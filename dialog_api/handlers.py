"""The worker's internal API: parse, call, respond. Only proxies call it."""

from __future__ import annotations

import hmac
import logging
import uuid

from aiohttp import web
from asyncpg import Record
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from dialog_api.appkeys import GROUP_COMMIT, MAP_VIEW, METRICS, SETTINGS, STORE
from dialog_api.storage import NewMessage, Stored
from dialogs import errors, wire
from dialogs.http import bearer_token, json_response, read_json, request_id_of
from dialogs.keys import INT64_MAX, INT64_MIN

log = logging.getLogger(__name__)


def _int64(value: object, name: str) -> int:
    if isinstance(value, bool):
        raise errors.InvalidInput(f"{name} must be a 64-bit integer")
    try:
        number = int(value)  # type: ignore[call-overload]  # any JSON value; int() refusing it is the check
    except (TypeError, ValueError):
        raise errors.InvalidInput(f"{name} must be a 64-bit integer") from None
    if not INT64_MIN <= number <= INT64_MAX:
        raise errors.InvalidInput(f"{name} must be a 64-bit integer")
    return number


def _uuid(value: object, name: str) -> uuid.UUID:
    try:
        return uuid.UUID(str(value))
    except ValueError:
        raise errors.InvalidInput(f"{name} must be a UUID") from None


def _require_proxy(request: web.Request) -> None:
    """The internal API trusts its caller's ``from``: only proxies, holding the secret, may call."""
    token = bearer_token(request, missing="the internal API needs the proxies' internal secret")
    if not hmac.compare_digest(token.encode(), request.app[SETTINGS].internal_secret.encode()):
        raise errors.Unauthorized("wrong internal secret")


def _routed_version(request: web.Request) -> int:
    raw = request.headers.get(wire.MAP_VERSION_HEADER)
    if raw is None:
        raise errors.InvalidInput(f"{wire.MAP_VERSION_HEADER} header is required")
    return _int64(raw, wire.MAP_VERSION_HEADER)


def _new_message(body: object) -> NewMessage:
    if not isinstance(body, dict):
        raise errors.InvalidInput("body must be a JSON object")
    text, key = body.get("text"), body.get("idempotency_key")
    if not isinstance(text, str) or not text:
        raise errors.InvalidInput("text must be a non-empty string")
    if key is not None and not isinstance(key, str):
        raise errors.InvalidInput("idempotency_key must be a string")
    return NewMessage(
        dialog_key=_int64(body.get("dialog_key"), "dialog_key"),
        from_user=_uuid(body.get("from"), "from"),
        to_user=_uuid(body.get("to"), "to"),
        text=text,
        idempotency_key=key,
    )


def _stored_json(stored: Stored) -> dict[str, object]:
    return {"id": str(stored.id), "created_at": stored.created_at.isoformat(), "duplicate": stored.duplicate}


async def insert_batch(request: web.Request) -> web.Response:
    """Many sends in one request, each checked and answered on its own (see wire.py)."""
    _require_proxy(request)
    items = await read_json(request)
    if not isinstance(items, list) or not items:
        raise errors.InvalidInput("body must be a non-empty JSON array")
    view, committer = request.app[MAP_VIEW], request.app[GROUP_COMMIT]
    results: list[dict[str, object] | None] = [None] * len(items)
    parsed: list[tuple[int, NewMessage, int]] = []
    for index, item in enumerate(items):
        try:
            parsed.append((index, _new_message(item), _int64(item.get("map_version"), "map_version")))
        except errors.DialogsError as exc:
            results[index] = {"status": exc.status, **exc.to_json(_item_request_id(request, item))}
    # A proxy routes a batch by one map: at most one reload, however many items name it.
    if parsed:
        await view.catch_up(max(version for *_, version in parsed))
    accepted: list[tuple[int, NewMessage]] = []
    for index, message, version in parsed:
        try:
            view.check_loaded_route(message.dialog_key, version)
            accepted.append((index, message))
        except errors.DialogsError as exc:
            results[index] = {"status": exc.status, **exc.to_json(_item_request_id(request, items[index]))}
    # Queued together, before any commit starts: one group commit takes them all.
    futures = committer.submit_many([message for _, message in accepted])
    for (index, _), future in zip(accepted, futures, strict=True):
        try:
            results[index] = {"status": 200, **_stored_json(await future)}
        except errors.DialogsError as exc:
            results[index] = {"status": exc.status, **exc.to_json(_item_request_id(request, items[index]))}
    if log.isEnabledFor(logging.DEBUG):  # each send keeps the client's request id in the worker's log
        for item, result in zip(items, results, strict=True):
            status = result["status"] if result else None
            log.debug(
                "send in batch %s", status, extra={"request_id": _item_request_id(request, item), "status": status}
            )
    return json_response(results)


def _item_request_id(request: web.Request, item: object) -> str:
    return str(item.get("request_id") or request_id_of(request)) if isinstance(item, dict) else ""


async def list_messages(request: web.Request) -> web.Response:
    _require_proxy(request)
    version = _routed_version(request)
    query = request.query
    dialog_key = _int64(query.get("dialog_key"), "dialog_key")
    user_a = _uuid(query.get("user_a"), "user_a")
    user_b = _uuid(query.get("user_b"), "user_b")
    before = _int64(query.get("before", INT64_MAX), "before")
    limit = _int64(query.get("limit", 100), "limit")
    if not 1 <= limit <= 1000:
        raise errors.InvalidInput("limit must be from 1 to 1000")
    await request.app[MAP_VIEW].check_route(dialog_key, version)
    rows = await request.app[STORE].list_messages(dialog_key, user_a, user_b, before, limit)
    return json_response([_message(row) for row in rows])


def _message(row: Record) -> dict[str, object]:
    sender, recipient = (row["user_lo"], row["user_hi"]) if row["from_lo"] else (row["user_hi"], row["user_lo"])
    return wire.message_json(row["id"], sender, recipient, row["text"], row["created_at"])


async def health(request: web.Request) -> web.Response:
    view = request.app[MAP_VIEW]
    await request.app[STORE].ping()
    return json_response({"status": "ok", "shard_id": request.app[SETTINGS].shard_id, "map_version": view.map_version})


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def setup_routes(app: web.Application) -> None:
    app.router.add_post(wire.INTERNAL_BATCH_PATH, insert_batch)
    app.router.add_get(wire.INTERNAL_MESSAGES_PATH, list_messages)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
