"""A planned switchover of a replicated shard, asked of its Patroni members' REST API.

Patroni does the work: it stops the primary, promotes the chosen (by default the
synchronous) standby and makes the old primary follow it. This module finds the current
primary from any member that answers, asks it to hand over, and waits until the group
names another primary. Proxies hold the shard's requests meanwhile (a failover wait).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from dialogs import errors

# Patroni's own switchover stops the primary and promotes within a few seconds.
TIMEOUT = 30.0
_CALL = aiohttp.ClientTimeout(total=5, sock_connect=1)


@dataclass(frozen=True)
class Done:
    old: str
    new: str
    seconds: float


def primary_of(view: dict[str, Any]) -> str | None:
    """The running primary's name in Patroni's ``GET /cluster`` answer, or None."""
    for member in view.get("members", []):
        if member.get("role") == "leader" and member.get("state") == "running":
            return str(member["name"])
    return None


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


async def switchover(urls: list[str], candidate: str | None) -> Done:
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
        target = leader_url or urls[0]
        try:
            async with session.post(
                target + "/switchover", json=body, timeout=aiohttp.ClientTimeout(total=TIMEOUT)
            ) as response:
                answer = await response.text()
                if response.status >= 400:
                    raise errors.Conflict(f"Patroni refused the switchover: {answer.strip()}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise errors.ShardUnavailable(f"the shard's primary did not take the switchover: {exc}") from None
        deadline = started + TIMEOUT
        while time.monotonic() < deadline:
            try:
                _, view = await _cluster(session, urls)
            except errors.ShardUnavailable:
                view = {}
            new = primary_of(view)
            if new is not None and new != old:
                return Done(old, new, round(time.monotonic() - started, 3))
            await asyncio.sleep(0.1)
    raise errors.ShardUnavailable(f"the switchover from {old} did not complete in {TIMEOUT:.0f} s")
