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


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://dialogs:p%40ss%3Aw%2Frd%231@db.example:5432/dialogs",
        "postgres://u:p@h/db?sslmode=require",
        "postgresql://u:p@h1:5432,h2:5433/db",
        "postgresql://u:p@[::1]:5432/db",
        "postgresql://u@[::1]/db",
        "postgresql:///dialogs?host=/run/postgresql",
        "postgresql://u:p@%2Frun%2Fpostgresql/db",
    ],
)
def test_valid_dsns_pass(dsn: str) -> None:
    assert pg.dsn_problem(dsn) is None


@pytest.mark.parametrize(
    ("dsn", "problem"),
    [
        ("mysql://u:p@h/db", "must be a postgresql:// URL"),
        ("postgresql://dialogs:p@ss:w/rd#1@h/db", "it holds a '#'"),
        ("postgresql://u:p@ss@h/db", "more than one '@'"),
        ("postgresql://u:12/ss@h/db", "database name holds '@' or '/'"),
        ("postgresql://u:p/x@h/db", "database name holds '@' or '/'"),
        ("postgresql://u:pa:ss@h:99999/db", "a port is not a number from 1 to 65535"),
        ("postgresql://u:p@h1:5432,h2:x/db", "a port is not a number"),
    ],
)
def test_bad_dsns_are_named_without_their_password(dsn: str, problem: str) -> None:
    """A password pasted with URL-special characters: a sentence with the fix, never the password."""
    message = pg.dsn_problem(dsn)
    assert message is not None and problem in message
    assert "URL-encode" in message or problem.startswith("must")
    assert not any(secret in message for secret in ("p@ss", "12/ss", "pa:ss"))


async def test_a_member_that_may_not_be_primary_is_unavailable() -> None:
    """pg.connect's NotThePrimary is a 503 for request paths and a retry for background loops."""
    with pytest.raises(errors.ShardUnavailable):
        async with pg.translated(errors.ShardUnavailable):
            raise pg.NotThePrimary("127.0.0.1:1 may not serve as the primary now")
    assert issubclass(pg.NotThePrimary, pg.FAILURES)


def test_a_group_dsn_is_split_into_its_members() -> None:
    dsn = "postgresql://u:p%40ss@127.0.0.1:5001,127.0.0.1:5002/dialogs?target_session_attrs=read-write"
    assert pg.hosts_of(dsn) == ["127.0.0.1:5001", "127.0.0.1:5002"]
    assert pg._with_host(dsn, "127.0.0.1:5002") == (
        "postgresql://u:p%40ss@127.0.0.1:5002/dialogs?target_session_attrs=read-write"
    )
