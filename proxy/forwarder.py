"""Forward a dialog request to a live worker of the shard that owns it.

The I/O half of forwarding: route by the current shard map, make each attempt, and
carry out what the pure decisions of ``proxy/retry_policy.py`` return (try the next
worker, reload the map and reroute, hold the request while its range is cut over, or
fail). Every retry rule is there, with its reasons.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace

import aiohttp
import orjson
from yarl import URL

from dialogs import errors, wire
from dialogs.watch import MetadataWatcher
from proxy import batcher, retry_policy
from proxy.batcher import NOT_CONNECTED, Batcher, worker_timeout
from proxy.metrics import ProxyMetrics
from proxy.retry_policy import (
    Answered,
    Attempt,
    Broken,
    Deliver,
    ErrorAnswer,
    Fail,
    NextWorker,
    NotConnected,
    Refused,
    Reload,
)
from proxy.topology import Topology

log = logging.getLogger(__name__)

# What a worker answers to the client's own mistake (a message not in the dialog, a reused
# Idempotency-Key): the client's answer, not a failure of the hop. Any other error (a 401
# for a wrong secret, a 413 for a batch too large) is counted as a forward error.
CLIENT_MISTAKES = frozenset({404, 422})

Attempter = Callable[[str, int], Awaitable[Attempt]]  # (worker URL, map version) -> outcome


class Forwarder:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        topology: Topology,
        watcher: MetadataWatcher,
        metrics: ProxyMetrics,
        timeout: float,
        cutover_wait: float,
        failover_wait: float,
        max_buffered: int,
        internal_secret: str,
        batch_max: int,
        batches_in_flight: int = 1,
        channels: bool = True,
    ) -> None:
        self._session = session
        self._authorization = f"Bearer {internal_secret}"
        self._topology = topology
        self._watcher = watcher
        self._metrics = metrics
        self._timeout = worker_timeout(timeout)
        self._cutover_wait = cutover_wait
        self._failover_wait = failover_wait
        self._max_buffered = max_buffered
        self._buffered = 0
        # Sends and list queries travel to workers in batches (``proxy/batcher.py``).
        self.batcher = Batcher(
            session, {"Authorization": self._authorization}, timeout, batch_max, batches_in_flight, channels
        )
        self._sends = batcher.sends(metrics.observe_send_batch)
        self._lists = batcher.lists(metrics.observe_list_batch)
        self._inbox_pages = batcher.inbox_pages()
        self._unread_totals = batcher.unread_totals()

    async def send(self, item: wire.SendItem) -> wire.SendResult:
        """Store one message on the shard that owns its dialog; any worker error is raised
        as the project's own. Sends travel to workers in batches (``proxy/batcher.py``)."""

        async def attempt(url: str, map_version: int) -> Attempt:
            return await self.batcher.submit(self._sends, url, replace(item, map_version=map_version))

        reply = await self._route(item.dialog_key, "send", attempt, repeatable=item.idempotency_key is not None)
        if not isinstance(reply, wire.SendResult):
            raise errors.DialogsError(f"a worker answered a send with {reply!r}")
        return reply

    async def list(self, query: wire.ListQuery) -> wire.Page:
        """One page of a dialog from the shard that owns it (in a batch, as sends travel)."""

        async def attempt(url: str, map_version: int) -> Attempt:
            return await self.batcher.submit(self._lists, url, replace(query, map_version=map_version))

        reply = await self._route(query.dialog_key, "list", attempt, repeatable=True)
        if not isinstance(reply, wire.Page):
            raise errors.DialogsError(f"a worker answered a list with {reply!r}")
        return reply

    async def inbox(self, query: wire.InboxQuery) -> wire.Page:
        """One page of a user's inbox from the shard that owns the user's key (in a batch)."""
        reply = await self._inbox_request(query, self._inbox_pages, "inbox")
        if not isinstance(reply, wire.Page):
            raise errors.DialogsError(f"a worker answered an inbox page with {reply!r}")
        return reply

    async def unread(self, query: wire.InboxQuery) -> wire.UnreadTotals:
        """A user's unread totals from the shard that owns the user's key (in a batch)."""
        reply = await self._inbox_request(query, self._unread_totals, "unread")
        if not isinstance(reply, wire.UnreadTotals):
            raise errors.DialogsError(f"a worker answered unread totals with {reply!r}")
        return reply

    async def _inbox_request(
        self, query: wire.InboxQuery, channel: batcher.Channel[wire.InboxQuery], operation: str
    ) -> retry_policy.Reply:
        async def attempt(url: str, map_version: int) -> Attempt:
            return await self.batcher.submit(channel, url, replace(query, map_version=map_version))

        return await self._route(query.user_key, operation, attempt, repeatable=True)

    async def mark_read(self, mark: wire.ReadMark) -> wire.ReadResult:
        """Move a reader's mark on the shard that owns the dialog. Repeatable: a mark applied
        twice is the same mark, so a broken answer is retried like a read."""
        headers = {"Authorization": self._authorization, "Content-Type": "application/json"}

        async def attempt(url: str, map_version: int) -> Attempt:
            body = orjson.dumps(replace(mark, map_version=map_version).to_json())
            return await self._exchange(
                "POST",
                url + wire.INTERNAL_READ_PATH,
                headers,
                lambda answer, _: wire.ReadResult.from_json(orjson.loads(answer)),
                body,
            )

        reply = await self._route(mark.dialog_key, "read", attempt, repeatable=True)
        if not isinstance(reply, wire.ReadResult):
            raise errors.DialogsError(f"a worker answered a read mark with {reply!r}")
        return reply

    async def _route(self, key: int, operation: str, attempt: Attempter, repeatable: bool) -> retry_policy.Reply:
        """Route ``key`` (a dialog's; a user's for the inbox) by the current map and carry out
        ``proxy/retry_policy.py``'s decisions.

        A request whose range is being cut over is buffered: held here and retried when
        the next shard map arrives (or every few milliseconds), for at most
        ``cutover_wait`` seconds; one whose shard's database no worker can reach (a primary
        failing over) for at most ``failover_wait``. The client sees a slower answer, not an
        error.
        """
        reloads = 0
        buffered_since: float | None = None
        reason_since = 0.0  # when the hold for the current reason (cutover or failover) began
        failover = False  # the last hold was for the shard's database, not for a cutover
        try:
            while True:
                shard_map = self._topology.map
                if shard_map is None:
                    raise errors.MetadataUnavailable("no shard map loaded yet")
                step = await self._on_shard(shard_map.owner(key), operation, shard_map.map_version, attempt, repeatable)
                if isinstance(step, Deliver):
                    return step.reply
                if isinstance(step.refusal, errors.Conflict):
                    self._metrics.stale_map_retries.inc()
                next_step = retry_policy.after_refusal(step.refusal, self._topology.map_version, reloads)
                if isinstance(next_step, Reload):
                    reloads += 1
                    await self._watcher.refresh(timeout=next_step.timeout)
                    if self._topology.map_version > shard_map.map_version:
                        continue
                now = time.monotonic()
                for_failover = isinstance(step.refusal, errors.Unavailable)
                if buffered_since is not None and for_failover != failover:
                    # Held for the other reason until now (a source primary lost during its
                    # cutover, then frozen again by the next attempt on its successor): this
                    # reason's bound counts from here, and the two bounds together cap the hold.
                    reason_since = now
                over = buffered_since is not None and now - buffered_since > self._cutover_wait + self._failover_wait
                held = retry_policy.buffer_wait(
                    step.refusal,
                    None if buffered_since is None else (float("inf") if over else now - reason_since),
                    retry_policy.wait_bound(step.refusal, self._cutover_wait, self._failover_wait),
                    self._buffered,
                    self._max_buffered,
                )
                if isinstance(held, Fail):
                    if held.reason != "unavailable" or buffered_since is not None:
                        self._metrics.buffer_overflows.inc()
                    raise held.error
                failover = for_failover
                if buffered_since is None:
                    buffered_since = reason_since = now
                    self._buffered += 1
                    self._metrics.buffered.inc()
                await self._topology.wait_for_change(held.seconds)
        finally:
            if buffered_since is not None:
                self._buffered -= 1
                self._metrics.buffered.dec()
                waited = self._metrics.failover_wait_seconds if failover else self._metrics.buffer_wait_seconds
                waited.observe(time.monotonic() - buffered_since)

    async def _on_shard(
        self, shard_id: str, operation: str, map_version: int, attempt: Attempter, repeatable: bool
    ) -> Deliver | Refused:
        """Try the shard's workers in turn until one delivers or refuses; raise on failure."""
        candidates = self._topology.candidates(shard_id)
        if not candidates:
            self._metrics.forward_errors.labels(shard_id, "no_worker").inc()
            raise errors.ShardUnavailable()
        for index, url in enumerate(candidates):
            started = time.perf_counter()
            outcome = await attempt(url, map_version)
            if isinstance(outcome, Answered | ErrorAnswer):  # the worker is up, whatever it said
                self._metrics.forward_seconds.labels(shard_id, operation).observe(time.perf_counter() - started)
                self._topology.mark_up(url)
            else:
                self._topology.mark_down(url)
            step = retry_policy.after_attempt(outcome, repeatable, len(candidates) - index - 1)
            if isinstance(step, NextWorker):
                self._metrics.forward_errors.labels(shard_id, step.reason).inc()
                continue
            if isinstance(step, Refused) and isinstance(step.refusal, errors.Unavailable):
                # No worker reached the database (or the write broke): counted like a failure,
                # so the shard-down alert sees it, even while the request is held for a failover.
                reason = "broken" if isinstance(outcome, Broken) else "unavailable"
                self._metrics.forward_errors.labels(shard_id, reason).inc()
            if isinstance(step, Fail):
                if step.error.status not in CLIENT_MISTAKES:
                    self._metrics.forward_errors.labels(shard_id, step.reason).inc()
                if step.reason == "wire":
                    log.error("%s to %s: %s", operation, url, step.error.message)
                raise step.error
            return step
        raise AssertionError("after_attempt fails on the last worker")  # pragma: no cover

    async def _exchange(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        parse: Callable[[bytes, Mapping[str, str]], retry_policy.Reply],
        body: bytes | None = None,
    ) -> Attempt:
        """One request to a worker, its outcome as the retry policy sees it; ``parse`` turns a
        200's body and headers into the reply (a ValueError: the answer is broken)."""
        try:
            # A ready-made, already encoded URL: aiohttp's own URL building costs more than
            # the rest of the proxy's work per request.
            async with self._session.request(
                method, URL(url, encoded=True), data=body, headers=headers, timeout=self._timeout
            ) as response:
                answer = await response.read()
        except NOT_CONNECTED:
            return NotConnected()
        except (aiohttp.ClientError, TimeoutError):
            return Broken()
        if response.status != 200:
            return ErrorAnswer(wire.error_from_response(response.status, answer, response.headers.get("Retry-After")))
        try:
            return Answered(parse(answer, response.headers))
        except ValueError:
            return Broken()
