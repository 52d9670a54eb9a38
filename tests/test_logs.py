"""Structured logs: JSON lines, and the request id carried from the proxy to the worker."""

from __future__ import annotations

import json
import logging

from dialogs.logs import JsonFormatter
from tests.support import Cluster


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter("test"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


async def test_request_id_reaches_the_worker_logs(cluster: Cluster) -> None:
    """One send with X-Request-ID: the proxy's and the worker's request logs both carry it, as JSON."""
    anna, token = await cluster.api.user("Anna")
    boris = await cluster.api.register("Boris")
    handler = Collect()
    loggers = [logging.getLogger("dialogs.http"), logging.getLogger("dialog_api.handlers")]
    previous = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    try:
        reply = await cluster.api.request(
            "POST",
            f"/dialog/{boris}/send",
            token=token,
            body={"text": "traced"},
            headers={"X-Request-ID": "trace-7f3a"},
        )
    finally:
        for logger, level in zip(loggers, previous, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)
    assert reply.status == 200
    entries = [json.loads(line) for line in handler.lines]
    traced = [e for e in entries if e.get("request_id") == "trace-7f3a"]
    routes = {e["message"] for e in traced}
    assert "POST /dialog/{user_id}/send 200" in routes
    assert "send in batch 200" in routes  # the worker's line for this send, inside a batch
    assert all(e["level"] == "debug" for e in traced)
    assert all(isinstance(e["ms"], float) for e in traced if e["message"].startswith("POST "))


def test_exceptions_and_extra_fields_are_fields() -> None:
    """Extra fields become JSON fields; exceptions are logged as text in one field."""
    formatter = JsonFormatter("proxy")
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.getLogger("x").makeRecord(
            "x",
            logging.ERROR,
            "f",
            1,
            "failed %s",
            ("once",),
            __import__("sys").exc_info(),
            extra={"shard_id": "shard-1"},
        )
    entry = json.loads(formatter.format(record))
    assert entry["message"] == "failed once" and entry["shard_id"] == "shard-1" and entry["service"] == "proxy"
    assert "ValueError: boom" in entry["exception"]
