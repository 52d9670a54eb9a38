"""asyncio helpers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Coroutine
from typing import Any

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def background(coro: Coroutine[Any, Any, Any]) -> AsyncIterator[asyncio.Task[Any]]:
    """Run ``coro`` as a task for the duration of the block, then cancel it and wait.

    However the task ends once cancelled (asyncpg, cancelled mid-query on a broken
    connection, may raise its own error instead of CancelledError), teardown goes on: the
    error is logged. Only a cancellation of the caller itself propagates.
    """
    task = asyncio.ensure_future(coro)
    try:
        yield task
    finally:
        task.cancel()
        await asyncio.wait([task])
        if not task.cancelled() and task.exception() is not None:
            log.warning("background task %s failed while stopping", task, exc_info=task.exception())
