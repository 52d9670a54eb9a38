"""Forward a dialog request to a live worker of the shard that owns it.

Retries only what is known not to have been applied: a refused connection (try the
shard's next worker), a stale-map refusal (reload the map, route again) and a refusal by
a range in cutover (buffer, then retry on the new owner). Reads are also retried on a
connection that broke mid-request. A worker that stops answering in the
middle of a send may or may not have stored it, so that becomes a 503 and the client
retries with its Idempotency-Key.
"""

from __future__ import annotations

import json
import time
from typing import Any
from urllib.parse import urlencode

import aiohttp
from yarl import URL

from dialogs import errors, wire
from dialogs.watch import MetadataWatcher
from proxy.metrics import ProxyMetrics
from proxy.topology import Topology

MAX_ROUTING_ATTEMPTS = 4
# While buffered, retry this often even without a new map (an aborted cutover changes none).
BUFFER_RETRY_SECONDS = 0.025


class Forwarder:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        topology: Topology,
        watcher: MetadataWatcher,
        metrics: ProxyMetrics,
        timeout: float,
        cutover_wait: float,
        max_buffered: int,
        internal_secret: str,
    ) -> None:
        self._session = session
        self._authorization = f"Bearer {internal_secret}"
        self._topology = topology
        self._watcher = watcher
        self._metrics = metrics
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._cutover_wait = cutover_wait
        self._max_buffered = max_buffered
        self._buffered = 0

    async def call(
        self,
        method: str,
        dialog_key: int,
        request_id: str,
        *,
        payload: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
    ) -> bytes:
        """The worker's 200 body; any worker error is re-raised as the project's own.

        A request whose range is being cut over is buffered: held here and retried when
        the next shard map arrives (or every few milliseconds), for at most
        ``cutover_wait`` seconds. The client sees a slower answer, not an error.
        """
        operation = "send" if method == "POST" else "list"
        # Encoded once: a buffered request may be retried every few milliseconds.
        body = json.dumps(payload).encode() if payload is not None else None
        path = wire.INTERNAL_MESSAGES_PATH + ("?" + urlencode(params) if params else "")
        reloads = 0
        buffered_since: float | None = None
        try:
            while True:
                shard_map = self._topology.map
                if shard_map is None:
                    raise errors.MetadataUnavailable("no shard map loaded yet")
                shard_id = shard_map.owner(dialog_key)
                headers = {
                    "Authorization": self._authorization,
                    wire.MAP_VERSION_HEADER: str(shard_map.map_version),
                    wire.REQUEST_ID_HEADER: request_id,
                }
                if body is not None:
                    headers["Content-Type"] = "application/json"
                try:
                    return await self._on_shard(shard_id, operation, method, headers, path, body)
                except errors.StaleMap as stale:
                    self._metrics.stale_map_retries.inc()
                    if stale.map_version > self._topology.map_version and reloads < MAX_ROUTING_ATTEMPTS:
                        reloads += 1
                        await self._watcher.refresh()
                        continue
                except errors.RangeNotServed:
                    # Either the map moved on and this proxy has not loaded it yet, or the
                    # range is between its old and new owner for a few milliseconds.
                    self._metrics.stale_map_retries.inc()
                    await self._watcher.refresh(timeout=0.5)
                    if self._topology.map_version > shard_map.map_version:
                        continue
                except errors.RangeMoving:
                    pass
                now = time.monotonic()
                if buffered_since is None:
                    if self._buffered >= self._max_buffered:
                        self._metrics.buffer_overflows.inc()
                        raise errors.ShardUnavailable("too many requests are waiting for a resharding cutover")
                    buffered_since = now
                    self._buffered += 1
                    self._metrics.buffered.inc()
                remaining = buffered_since + self._cutover_wait - now
                if remaining <= 0:
                    self._metrics.buffer_overflows.inc()
                    raise errors.ShardUnavailable("this dialog is being moved between shards; retry shortly")
                await self._topology.wait_for_change(min(BUFFER_RETRY_SECONDS, remaining))
        finally:
            if buffered_since is not None:
                self._buffered -= 1
                self._metrics.buffered.dec()
                self._metrics.buffer_wait_seconds.observe(time.monotonic() - buffered_since)

    async def _on_shard(
        self,
        shard_id: str,
        operation: str,
        method: str,
        headers: dict[str, str],
        path: str,
        body: bytes | None,
    ) -> bytes:
        candidates = self._topology.candidates(shard_id)
        if not candidates:
            self._metrics.forward_errors.labels(shard_id, "no_worker").inc()
            raise errors.ShardUnavailable()
        last_error: errors.DialogsError = errors.ShardUnavailable()
        for url in candidates:
            started = time.perf_counter()
            try:
                # A ready-made, already encoded URL and body: aiohttp's own URL building and
                # JSON handling cost more than the rest of the proxy's work per request.
                async with self._session.request(
                    method,
                    URL(url + path, encoded=True),
                    data=body,
                    headers=headers,
                    timeout=self._timeout,
                ) as response:
                    answer = await response.read()
            except aiohttp.ClientConnectorError:
                # Never reached the worker: nothing was applied, the next one may take it.
                self._topology.mark_down(url)
                self._metrics.forward_errors.labels(shard_id, "connect").inc()
                continue
            except (aiohttp.ClientError, TimeoutError):
                self._topology.mark_down(url)
                self._metrics.forward_errors.labels(shard_id, "broken").inc()
                if method == "GET":
                    continue  # a read can always be tried again elsewhere
                raise errors.ShardUnavailable() from None
            self._metrics.forward_seconds.labels(shard_id, operation).observe(time.perf_counter() - started)
            self._topology.mark_up(url)
            if response.status == 200:
                return answer
            error = _worker_error(response.status, answer)
            if isinstance(error, errors.ShardUnavailable):
                # This worker cannot reach its database; another worker of the shard might.
                self._metrics.forward_errors.labels(shard_id, "unavailable").inc()
                last_error = error
                continue
            if not isinstance(error, errors.StaleMap):
                self._metrics.forward_errors.labels(shard_id, str(response.status)).inc()
            raise error
        raise last_error


def _worker_error(status: int, body: bytes) -> errors.DialogsError:
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        return errors.ShardUnavailable() if status >= 500 else errors.DialogsError()
    return errors.from_json(status, data)
