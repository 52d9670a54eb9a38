"""The naive single-node monolith the sharded service must beat (issue 9's baseline).

One aiohttp process, the way a first version of the dialogs API would be written: every
send verifies its JWT with PyJWT (no cache), validates the body, and runs one INSERT in
autocommit on one PostgreSQL server through an asyncpg pool. No batching, no routing.

    python -m bench.monolith --dsn postgresql://… --port 8090 --secret …

It creates its own table (``monolith_messages``) in the given database.
"""

from __future__ import annotations

import argparse
import itertools
import time
import uuid
from collections.abc import AsyncIterator

import asyncpg
import jwt
from aiohttp import web

DSN = web.AppKey("dsn", str)
SECRET = web.AppKey("secret", str)
POOL = web.AppKey("pool", asyncpg.Pool)

_TABLE = """
CREATE TABLE IF NOT EXISTS monolith_messages (
    id bigint PRIMARY KEY,
    from_user uuid NOT NULL,
    to_user uuid NOT NULL,
    text text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
)
"""
_INSERT = "INSERT INTO monolith_messages (id, from_user, to_user, text) VALUES ($1, $2, $3, $4) RETURNING created_at"
_ids = itertools.count(int(time.time() * 1000) << 20)


async def send(request: web.Request) -> web.Response:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    try:
        claims = jwt.decode(token, request.app[SECRET], algorithms=["HS256"], options={"require": ["exp"]})
        sender = uuid.UUID(claims["sub"])
        recipient = uuid.UUID(request.match_info["user_id"])
    except (jwt.PyJWTError, KeyError, ValueError):
        return web.json_response({"message": "unauthorized or bad user id"}, status=401)
    body = await request.json()
    text = body.get("text") if isinstance(body, dict) else None
    if not isinstance(text, str) or not text:
        return web.json_response({"message": "text must be a non-empty string"}, status=400)
    message_id = next(_ids)
    created_at = await request.app[POOL].fetchval(_INSERT, message_id, sender, recipient, text)
    return web.json_response({"id": str(message_id), "created_at": created_at.isoformat()})


async def _pool(app: web.Application) -> AsyncIterator[None]:
    async with asyncpg.create_pool(app[DSN], min_size=8, max_size=32) as pool:
        await pool.execute(_TABLE)
        app[POOL] = pool
        yield


def create_app(dsn: str, secret: str) -> web.Application:
    app = web.Application()
    app[DSN], app[SECRET] = dsn, secret
    app.cleanup_ctx.append(_pool)
    app.router.add_post("/dialog/{user_id}/send", send)
    app.router.add_get("/health", lambda request: web.json_response({"status": "ok"}))
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--secret", required=True)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(create_app(args.dsn, args.secret), host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
