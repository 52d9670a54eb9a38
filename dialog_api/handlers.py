"""The worker's internal API: parse, call, respond. Only proxies call it."""

from __future__ import annotations

import hmac
import uuid

from aiohttp import web
from asyncpg import Record
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from dialog_api.appkeys import GROUP_COMMIT, MAP_VIEW, METRICS, SETTINGS, STORE
from dialog_api.storage import NewMessage
from dialogs import errors, wire
from dialogs.http import bearer_token, json_response, read_json
from dialogs.keys import INT64_MAX, INT64_MIN


def _int64(value: object, name: str) -> int:
    if isinstance(value, bool):
        raise errors.InvalidInput(f"{name} must be a 64-bit integer")
    try:
        number = int(value)  # type: ignore[call-overload]
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


async def insert_message(request: web.Request) -> web.Response:
    _require_proxy(request)
    version = _routed_version(request)
    body = await read_json(request)
    if not isinstance(body, dict):
        raise errors.InvalidInput("body must be a JSON object")
    text, key = body.get("text"), body.get("idempotency_key")
    if not isinstance(text, str) or not text:
        raise errors.InvalidInput("text must be a non-empty string")
    if key is not None and not isinstance(key, str):
        raise errors.InvalidInput("idempotency_key must be a string")
    message = NewMessage(
        dialog_key=_int64(body.get("dialog_key"), "dialog_key"),
        from_user=_uuid(body.get("from"), "from"),
        to_user=_uuid(body.get("to"), "to"),
        text=text,
        idempotency_key=key,
    )
    await request.app[MAP_VIEW].check_route(message.dialog_key, version)
    stored = await request.app[GROUP_COMMIT].submit(message)
    return json_response(
        {"id": str(stored.id), "created_at": stored.created_at.isoformat(), "duplicate": stored.duplicate}
    )


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
    return json_response(
        {"status": "ok", "shard_id": request.app[SETTINGS].shard_id, "map_version": view.map_version}
    )


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def setup_routes(app: web.Application) -> None:
    app.router.add_post(wire.INTERNAL_MESSAGES_PATH, insert_message)
    app.router.add_get(wire.INTERNAL_MESSAGES_PATH, list_messages)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
