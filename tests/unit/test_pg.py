"""Database failures map to 503s in one place; bugs stay bugs."""

from __future__ import annotations

import asyncpg
import pytest

from dialogs import errors, pg


@pytest.mark.parametrize(
    "failure",
    [
        ConnectionRefusedError(111, "refused"),
        TimeoutError(),
        asyncpg.InternalClientError("cannot switch to state 12; another operation (2) is in progress"),
        asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        asyncpg.AdminShutdownError("terminating connection due to administrator command"),
        asyncpg.QueryCanceledError("canceling statement due to statement timeout"),
    ],
)
async def test_unavailable_databases_are_503(failure: BaseException) -> None:
    """A server killed mid-query, restarting or too slow: the client gets a 503 to retry."""
    with pytest.raises(errors.ShardUnavailable) as raised:
        async with pg.translated(errors.ShardUnavailable):
            raise failure
    assert raised.value.status == 503 and raised.value.__cause__ is failure


async def test_a_query_bug_is_not_hidden_as_503() -> None:
    """A syntax error is the code's fault: it stays itself (and becomes a 500 with a log line)."""
    with pytest.raises(asyncpg.PostgresSyntaxError):
        async with pg.translated(errors.MetadataUnavailable):
            raise asyncpg.PostgresSyntaxError("syntax error")
