"""The public API: parse, call, respond. Authentication comes before any other check."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from dialogs import checks, errors, wire
from dialogs.http import json_response, read_json, request_id_of
from dialogs.keys import INT64_MAX, dialog_key, user_key
from proxy import admin, discovery, openapi, validation
from proxy.appkeys import (
    FORWARDER,
    KNOWN_USERS,
    LOGIN_GUARD,
    METADATA,
    METRICS,
    PASSWORDS,
    SETTINGS,
    TOKENS,
    TOPOLOGY,
    WATCHER,
)
from proxy.clients import client_address


def user_json(row: asyncpg.Record) -> dict[str, Any]:
    """A user as the spec types it: a birthdate never given is left out, never null
    (``User.birthdate`` is a non-nullable date; generated clients reject null)."""
    user = {
        "id": str(row["id"]),
        "first_name": row["first_name"],
        "second_name": row["second_name"],
        "biography": row["biography"],
        "city": row["city"],
    }
    if row["birthdate"] is not None:
        user["birthdate"] = row["birthdate"].isoformat()
    return user


async def register(request: web.Request) -> web.Response:
    new_user = validation.registration(await read_json(request))
    password_hash = await request.app[PASSWORDS].hash(new_user.password)
    user_id = await request.app[METADATA].create_user(new_user, password_hash)
    request.app[KNOWN_USERS].add(user_id)
    return json_response({"user_id": str(user_id)})


async def login(request: web.Request) -> web.Response:
    user_id, password = validation.login(await read_json(request))
    guard, user_key = request.app[LOGIN_GUARD], str(user_id)
    address = client_address(request, request.app[SETTINGS].trusted_proxies)
    guard.attempt(user_key, address)  # counted before any hashing; a refused attempt costs nothing
    try:
        password_hash = await request.app[METADATA].password_hash(user_id)
        right = password_hash is not None and await request.app[PASSWORDS].verify(password_hash, password)
    except errors.Unavailable:
        guard.not_judged(user_key, address)
        raise
    if password_hash is None:
        raise errors.UserNotFound()  # guessing ids counts against the address too
    if not right:
        raise errors.InvalidInput("wrong password")
    guard.succeeded(user_key, address)
    return json_response({"token": request.app[TOKENS].issue(user_id)})


async def get_user(request: web.Request) -> web.Response:
    user_id = validation.user_id(request.match_info["id"], "id")
    row = await request.app[METADATA].user(user_id)
    if row is None:
        raise errors.UserNotFound()
    return json_response(user_json(row))


async def search_users(request: web.Request) -> web.Response:
    first_name, last_name, limit = validation.search(request.query)
    rows = await request.app[METADATA].search_users(first_name, last_name, limit)
    return json_response([user_json(row) for row in rows])


async def send_message(request: web.Request) -> web.Response:
    sender = request.app[TOKENS].user_of(request)
    recipient = validation.user_id(request.match_info["user_id"])
    key = checks.idempotency_key(request.headers.get(wire.IDEMPOTENCY_KEY_HEADER))
    text = validation.send_text(await read_json(request), request.app[SETTINGS].max_text_length)
    await request.app[KNOWN_USERS].ensure(recipient)
    item = wire.SendItem(
        dialog_key=dialog_key(sender, recipient),
        from_user=sender,
        to_user=recipient,
        text=text,
        idempotency_key=key,
        map_version=None,  # the forwarder sets the version it routes with
        request_id=request_id_of(request),
    )
    stored = await request.app[FORWARDER].send(item)
    headers = {"Idempotent-Replayed": "true"} if stored.duplicate else None
    return json_response({"id": str(stored.id), "created_at": stored.created_at}, headers=headers)


async def list_messages(request: web.Request) -> web.Response:
    viewer = request.app[TOKENS].user_of(request)
    other = validation.user_id(request.match_info["user_id"])
    query = wire.ListQuery(
        dialog_key=dialog_key(viewer, other),
        viewer=viewer,
        other=other,
        before=validation.list_before(request.query.get("before")),
        limit=validation.list_limit(request.query.get("limit")),
        map_version=None,  # the forwarder sets the version it routes with
        request_id=request_id_of(request),
    )
    page = await request.app[FORWARDER].list(query)
    if page.empty:
        # As for sends, an unknown user is a 404. Checked only for an empty page: a dialog
        # with messages proves both users exist (users are never deleted), so lists of
        # live dialogs cost the metadata database nothing.
        await request.app[KNOWN_USERS].ensure(other)
    # The worker already speaks the public message format: pass the bytes through.
    return web.Response(body=page.body, content_type="application/json")


async def mark_read(request: web.Request) -> web.Response:
    reader = request.app[TOKENS].user_of(request)
    other = validation.user_id(request.match_info["user_id"])
    up_to = validation.read_up_to(await read_json(request, empty={}))
    mark = wire.ReadMark(
        dialog_key=dialog_key(reader, other),
        reader=reader,
        other=other,
        up_to=up_to,
        map_version=None,  # the forwarder sets the version it routes with
        request_id=request_id_of(request),
    )
    result = await request.app[FORWARDER].mark_read(mark)
    if result.up_to is None:
        await request.app[KNOWN_USERS].ensure(other)  # an empty dialog: is there such a user?
    return json_response(result.to_json())


def _inbox_query(
    request: web.Request, owner: uuid.UUID, before: int = INT64_MAX, limit: int = wire.DEFAULT_LIST_LIMIT
) -> wire.InboxQuery:
    return wire.InboxQuery(
        user_key=user_key(owner),
        owner=owner,
        before=before,
        limit=limit,
        map_version=None,  # the forwarder sets the version it routes with
        request_id=request_id_of(request),
    )


async def inbox(request: web.Request) -> web.Response:
    """The caller's conversations, newest activity first (docs/inbox.md)."""
    owner = request.app[TOKENS].user_of(request)
    query = _inbox_query(
        request,
        owner,
        before=validation.list_before(request.query.get("before")),
        limit=validation.list_limit(request.query.get("limit")),
    )
    page = await request.app[FORWARDER].inbox(query)
    # The worker already speaks the public format: pass the bytes through.
    return web.Response(body=page.body, content_type="application/json")


async def unread(request: web.Request) -> web.Response:
    owner = request.app[TOKENS].user_of(request)
    totals = await request.app[FORWARDER].unread(_inbox_query(request, owner))
    return json_response(totals.to_json())


async def health(request: web.Request) -> web.Response:
    topology = request.app[TOPOLOGY]
    shard_map = topology.map
    body = {
        "status": "ok" if shard_map is not None else "starting",
        "map_version": topology.map_version,
        "metadata": "up" if request.app[WATCHER].connected else "down",
        "shards": {s: {"workers": topology.worker_count(s)} for s in (shard_map.shard_ids if shard_map else [])},
    }
    return json_response(body, status=200 if shard_map is not None else 503)


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def openapi_document(request: web.Request) -> web.Response:
    return json_response(openapi.document())


def setup_routes(app: web.Application) -> None:
    admin.setup_routes(app)
    router = app.router
    router.add_post("/user/register", register)
    router.add_post("/login", login)
    router.add_get("/user/get/{id}", get_user)
    router.add_get("/user/search", search_users)
    router.add_post("/dialog/{user_id}/send", send_message)
    router.add_get("/dialog/{user_id}/list", list_messages)
    router.add_post("/dialog/{user_id}/read", mark_read)
    router.add_get("/dialogs", inbox)
    router.add_get("/dialogs/unread", unread)
    router.add_get("/openapi.json", openapi_document)
    router.add_get("/health", health)
    router.add_get("/metrics", metrics)
    router.add_get("/discovery/prometheus", discovery.prometheus_targets)
