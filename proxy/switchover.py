"""A planned switchover of a replicated shard, asked of its Patroni members' REST API.

Patroni does the work: it stops the primary, promotes the chosen (by default the
synchronous) standby and makes the old primary follow it. This module finds the current
primary from any member that answers, asks it to hand over, and waits until the group
names another primary. Proxies hold the shard's requests meanwhile (a failover wait).

Before Patroni is asked, the shard's workers pause their writes (``writes_paused``): the
commits in flight finish, later sends are answered "unavailable" without touching the
database, and the proxies hold and retry them. So nothing is committing when the primary
stops, and a send without an Idempotency-Key, which nothing may send twice, never meets a
commit cut short (``SendOutcomeUnknown``). The pause is a lease the switchover renews
every second and ends when the new primary runs; a caller that dies leaves the shard's
writes paused for at most ``PAUSE_LEASE_SECONDS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp

from dialogs import errors, wire

log = logging.getLogger(__name__)

# Patroni's own switchover stops the primary and promotes within a few seconds.
TIMEOUT = 30.0
_CALL = aiohttp.ClientTimeout(total=5, sock_connect=1)
# An answer from Patroni that is neither done nor a refusal: how long the view may still show
# a new primary before the switchover is reported failed (and the shard's writes resume).
UNCLEAR_GRACE = 5.0
PAUSE_LEASE_SECONDS = 5.0
PAUSE_RENEW_SECONDS = 1.0
# The first pause answers once the worker's commits in flight are done (at most its query
# timeout, 5 s by default); a renewal at once, and must land well inside the lease.
_DRAIN_CALL = aiohttp.ClientTimeout(total=15, sock_connect=1)
_RENEW_CALL = aiohttp.ClientTimeout(total=2, sock_connect=1)


@dataclass(frozen=True)
class Paused:
    """How many of the shard's workers paused their writes (the others did not answer)."""

    workers: int
    paused: int


@dataclass(frozen=True)
class Done:
    old: str
    new: str
    seconds: float
    paused: Paused


def primary_of(view: dict[str, Any]) -> str | None:
    """The running primary's name in Patroni's ``GET /cluster`` answer, or None."""
    for member in view.get("members", []):
        if member.get("role") == "leader" and member.get("state") == "running":
            return str(member["name"])
    return None


ROLE_NAMES = {"leader": "primary", "sync_standby": "sync standby", "replica": "standby"}


def member_row(member: dict[str, Any]) -> dict[str, Any]:
    """One member of Patroni's ``GET /cluster`` answer as `dialogs status` shows it: name,
    role (primary, sync standby, standby), state, timeline, lag in bytes (None when unknown)."""
    lag, timeline = member.get("lag"), member.get("timeline")
    return {
        "name": str(member.get("name", "?")),
        "role": ROLE_NAMES.get(member.get("role", ""), str(member.get("role", "?"))),
        "state": str(member.get("state", "")),
        "timeline": timeline if isinstance(timeline, int) else None,
        "lag_bytes": lag if isinstance(lag, int) and not isinstance(lag, bool) else None,
    }


async def group_members(urls: list[str]) -> list[dict[str, Any]]:
    """The group's members (``member_row``) from the first member that answers; when none
    does, one row per registered member, down."""
    async with aiohttp.ClientSession() as session:
        try:
            _, view = await _cluster(session, urls)
        except errors.ShardUnavailable:
            return [
                {"name": url, "role": "down", "state": "unreachable", "timeline": None, "lag_bytes": None}
                for url in urls
            ]
    return [member_row(member) for member in view.get("members", [])]


def problem(view: dict[str, Any], candidate: str | None) -> str | None:
    """Why a switchover cannot start on this view of the group, or None."""
    if primary_of(view) is None:
        return "the shard has no running primary to hand over from (a failover may be under way)"
    standbys = [m for m in view.get("members", []) if m.get("role") in ("sync_standby", "replica")]
    if candidate is not None and candidate not in {m.get("name") for m in standbys}:
        return f"{candidate} is not a standby of this shard"
    # "streaming" from Patroni 3.1 on; before it a standby that replays is "running" (Debian
    # bookworm's Patroni 3.0, in the compose stack's image).
    if not any(m.get("state") in ("streaming", "running") for m in standbys):
        return "the shard has no streaming standby to hand over to"
    return None


async def _cluster(session: aiohttp.ClientSession, urls: list[str]) -> tuple[str, dict[str, Any]]:
    """(the URL that answered, its view of the group) from the first member that answers."""
    for url in urls:
        try:
            async with session.get(url + "/cluster", timeout=_CALL) as response:
                view = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            continue
        if isinstance(view, dict) and "members" in view:
            return url, view
    raise errors.ShardUnavailable("no Patroni member of this shard answers")


@contextlib.asynccontextmanager
async def writes_paused(
    session: aiohttp.ClientSession, worker_urls: list[str], internal_secret: str
) -> AsyncIterator[Paused]:
    """The workers' writes paused inside the block, resumed after it, also when it fails.

    Each worker has a task of its own: its first pause, then a renewal every second, so a
    worker slow to drain delays no other's renewal. The block starts once every worker
    has answered its first pause. A worker that refuses the connection is left as it is
    (its sends meet the switchover as they would a crash: keyed ones are retried, unkeyed
    ones may get 503). One that still had a commit running after its query timeout, or did
    not answer in time, stops the switchover before Patroni is asked (``ShardUnavailable``):
    Patroni would cut that commit short.
    """
    holder = f"switchover-{uuid.uuid4().hex[:12]}"
    headers = {"Authorization": f"Bearer {internal_secret}"}
    pause = wire.WritePause(holder, PAUSE_LEASE_SECONDS).to_json()
    stop = asyncio.Event()

    async def call(url: str, path: str, body: dict[str, Any], timeout: aiohttp.ClientTimeout) -> Any:
        """The worker's answer; None if no request reached it (or it is not a worker of this
        wire); TimeoutError if it took the request and did not answer in time."""
        try:
            async with session.post(url + path, json=body, headers=headers, timeout=timeout) as response:
                return await response.json() if response.status == 200 else None
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError):
            return None
        except (aiohttp.ServerTimeoutError, TimeoutError):
            raise TimeoutError from None
        except (aiohttp.ClientError, ValueError):
            return None

    async def hold(url: str, first: asyncio.Future[str]) -> None:
        """Pause ``url``'s writes and renew the pause until ``stop``; ``first`` says how the
        first pause went: "drained", "busy" or "unreachable"."""
        try:
            answer = await call(url, wire.INTERNAL_PAUSE_PATH, pause, _DRAIN_CALL)
        except TimeoutError:
            answer = {"drained": False}
        first.set_result("unreachable" if answer is None else "drained" if answer.get("drained") else "busy")
        if answer is None:
            return
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), PAUSE_RENEW_SECONDS)
            if stop.is_set():
                return
            try:
                renewed = await call(url, wire.INTERNAL_PAUSE_PATH, pause, _RENEW_CALL)
            except TimeoutError:
                renewed = None
            if renewed is None:
                log.warning("worker %s did not renew its write pause", url)

    firsts = [asyncio.get_running_loop().create_future() for _ in worker_urls]
    holders = [asyncio.ensure_future(hold(url, first)) for url, first in zip(worker_urls, firsts, strict=True)]
    try:
        outcomes = await asyncio.gather(*firsts)
        unreachable = outcomes.count("unreachable")
        if unreachable:
            log.warning("%d of %d workers did not pause their writes", unreachable, len(worker_urls))
        if "busy" in outcomes:
            raise errors.ShardUnavailable(
                f"{outcomes.count('busy')} of the shard's workers still had a commit running after their query"
                " timeout; the switchover was not started: try again"
            )
        yield Paused(len(worker_urls), len(worker_urls) - unreachable)
    finally:
        stop.set()  # each worker's task finishes the renewal it is making before the resume
        await asyncio.gather(*holders, return_exceptions=True)
        resume = wire.WriteResume(holder).to_json()
        resumed = await asyncio.gather(
            *(call(url, wire.INTERNAL_RESUME_PATH, resume, _RENEW_CALL) for url in worker_urls), return_exceptions=True
        )
        if any(not isinstance(answer, dict) for answer in resumed):
            log.warning("a worker did not take the end of its pause; it ends by itself in %.0f s", PAUSE_LEASE_SECONDS)


async def switchover(urls: list[str], candidate: str | None, worker_urls: list[str], internal_secret: str) -> Done:
    """Hand the group's primary role over, with the writes of ``worker_urls`` (the shard's
    workers; none for `meta`) paused while Patroni is asked and its new primary awaited."""
    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        _, view = await _cluster(session, urls)
        reason = problem(view, candidate)
        if reason is not None:
            raise errors.Conflict(reason)
        old = primary_of(view)
        assert old is not None
        leader_url = next(
            (m["api_url"].rsplit("/", 1)[0] for m in view["members"] if m["name"] == old and m.get("api_url")), None
        )
        body = {"leader": old, **({"candidate": candidate} if candidate else {})}
        async with writes_paused(session, worker_urls, internal_secret) as paused:
            # Patroni answers the request only when it next polls its result, once a second:
            # the group's view shows the new primary up to a second sooner, and the pause
            # ends then. The answer is still read, after: a refusal comes at once.
            asked = asyncio.ensure_future(_ask(session, leader_url or urls[0], body))
            try:
                new = await _new_primary(session, urls, old, asked, started + TIMEOUT)
            except BaseException:
                asked.cancel()
                await asyncio.gather(asked, return_exceptions=True)
                raise
        seconds = round(time.monotonic() - started, 3)  # writes resumed
        try:  # Patroni's own answer, at its next poll: the switchover has happened whatever it says
            unclear = await asyncio.wait_for(asked, 5)
        except (errors.DialogsError, TimeoutError) as exc:
            unclear = str(exc)
        if unclear is not None:
            log.warning("the switchover to %s happened, but Patroni answered: %s", new, unclear)
    return Done(old, new, seconds, paused)


async def _ask(session: aiohttp.ClientSession, leader_url: str, body: dict[str, str]) -> str | None:
    """None once Patroni says the switchover is done; a refusal (4xx: nothing was started)
    raises Conflict; anything else (a 5xx, a lost connection) is returned as words: the
    switchover may still be under way, and the group's view decides."""
    try:
        async with session.post(
            leader_url + "/switchover", json=body, timeout=aiohttp.ClientTimeout(total=TIMEOUT)
        ) as response:
            answer = (await response.text()).strip()
    except (aiohttp.ClientError, TimeoutError) as exc:
        return f"the shard's primary did not answer the switchover: {exc!r}"
    if 400 <= response.status < 500:
        raise errors.Conflict(f"Patroni refused the switchover: {answer}")
    return None if response.status < 300 else f"Patroni answered {response.status}: {answer}"


async def _new_primary(
    session: aiohttp.ClientSession, urls: list[str], old: str, asked: asyncio.Future[str | None], deadline: float
) -> str:
    """The group's new running primary, once it has one; Patroni's refusal if it refused.
    After an answer that is neither, the view has a few more seconds to show it."""
    unclear: str | None = None
    while time.monotonic() < deadline:
        if asked.done() and unclear is None and (unclear := asked.result()) is not None:
            deadline = min(deadline, time.monotonic() + UNCLEAR_GRACE)
        try:
            _, view = await _cluster(session, urls)
        except errors.ShardUnavailable:
            view = {}
        new = primary_of(view)
        if new is not None and new != old:
            return new
        await asyncio.sleep(0.05)
    raise errors.ShardUnavailable(unclear or f"the switchover from {old} did not complete in {TIMEOUT:.0f} s")
