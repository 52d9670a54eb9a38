"""Bearer tokens (HS256 JWT, verified without a database round trip) and password hashing."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import argon2
import jwt
from aiohttp import web

from dialogs import errors
from dialogs.http import bearer_token

_LEEWAY_SECONDS = 5

T = TypeVar("T")


class TokenAuthority:
    """Issues and verifies user tokens.

    A token from the monolith signed with the same secret works too: the user id is read
    from ``sub``, or from ``user_id`` when ``sub`` is absent, and ``exp`` is required.
    """

    def __init__(self, secret: str, ttl_seconds: int, cache_size: int = 100_000) -> None:
        self._secret = secret
        self._ttl = ttl_seconds
        # Verified tokens and their expiry: a client sends the same token many times, and
        # a cache hit skips the HMAC and two JSON decodes.
        self._verified: collections.OrderedDict[str, tuple[uuid.UUID, float]] = collections.OrderedDict()
        self._cache_size = cache_size

    def issue(self, user_id: uuid.UUID) -> str:
        now = int(time.time())
        return jwt.encode({"sub": str(user_id), "iat": now, "exp": now + self._ttl}, self._secret, algorithm="HS256")

    def verify(self, token: str) -> uuid.UUID:
        cached = self._verified.get(token)
        if cached is not None:
            user_id, expires = cached
            if time.time() <= expires + _LEEWAY_SECONDS:
                return user_id
            del self._verified[token]
            raise errors.TokenExpired()
        user_id, expires = self._decode(token)
        self._verified[token] = (user_id, expires)
        if len(self._verified) > self._cache_size:
            self._verified.popitem(last=False)
        return user_id

    def _decode(self, token: str) -> tuple[uuid.UUID, float]:
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=["HS256"],
                options={"require": ["exp"], "verify_sub": False},
                leeway=_LEEWAY_SECONDS,
            )
        except jwt.ExpiredSignatureError:
            raise errors.TokenExpired() from None
        except jwt.PyJWTError:
            raise errors.Unauthorized("invalid bearer token") from None
        subject = claims.get("sub", claims.get("user_id"))
        try:
            return uuid.UUID(str(subject)), float(claims["exp"])
        except (ValueError, TypeError):
            raise errors.Unauthorized("token does not name a user") from None

    def user_of(self, request: web.Request) -> uuid.UUID:
        return self.verify(bearer_token(request))


class Passwords:
    """Argon2id, off the event loop, at most ``concurrency`` at once.

    One hash costs tens of milliseconds of CPU and ``memory_kib`` of memory, so a burst of
    logins must not run them all at once: the rest wait up to ``wait`` seconds for a turn,
    then get Overloaded (503 with Retry-After).
    """

    def __init__(self, time_cost: int, memory_kib: int, concurrency: int, wait: float) -> None:
        self._hasher = argon2.PasswordHasher(time_cost=time_cost, memory_cost=memory_kib, parallelism=1)
        self._executor = concurrent.futures.ThreadPoolExecutor(concurrency, thread_name_prefix="argon2")
        self._turns = asyncio.Semaphore(concurrency)
        self._wait = wait

    async def hash(self, password: str) -> str:
        return await self._run(self._hasher.hash, password)

    async def verify(self, password_hash: str, password: str) -> bool:
        def check() -> bool:
            try:
                return self._hasher.verify(password_hash, password)
            except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
                return False

        return await self._run(check)

    async def _run(self, function: Callable[..., T], *args: Any) -> T:
        try:
            async with asyncio.timeout(self._wait):
                await self._turns.acquire()
        except TimeoutError:
            raise errors.Overloaded() from None
        future = asyncio.get_running_loop().run_in_executor(self._executor, function, *args)
        # The turn ends when the hash does, even if the client went away meanwhile.
        future.add_done_callback(lambda _: self._turns.release())
        return await asyncio.shield(future)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
