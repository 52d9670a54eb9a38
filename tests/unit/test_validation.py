"""The proxy's input checks, without any server: every refusal is a 400 with a sentence."""

from __future__ import annotations

import datetime
import uuid

import pytest

from dialogs import checks, errors, wire
from proxy import validation


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "text is required"),
        ({"text": 5}, "text must be a string"),
        ({"text": "  "}, "text must not be empty"),
        ({"text": "a" * 11}, "at most 10 characters"),
        ({"text": "a\x00b"}, "NUL"),
        ({"text": "\ud800"}, "valid Unicode"),
        ([], "JSON object"),
    ],
)
def test_send_text_refusals(body: object, message: str) -> None:
    """What a send's body may not be."""
    with pytest.raises(errors.InvalidInput, match=message):
        validation.send_text(body, max_length=10)


def test_send_text_keeps_what_is_valid() -> None:
    """Multibyte text is counted in characters, not bytes."""
    assert validation.send_text({"text": "я" * 10}, max_length=10) == "я" * 10


@pytest.mark.parametrize(
    ("raw", "expected"),
    [(None, wire.DEFAULT_LIST_LIMIT), ("1", 1), ("1000", 1000)],
)
def test_list_limit(raw: str | None, expected: int) -> None:
    """Default 100, from 1 to 1000."""
    assert validation.list_limit(raw) == expected


@pytest.mark.parametrize("raw", ["0", "1001", "-1", "ten", "1e3", "9" * 5000])
def test_list_limit_refusals(raw: str) -> None:
    """Out of range or not an integer (also absurdly long digit strings)."""
    with pytest.raises(errors.InvalidInput, match="limit must be an integer from 1 to 1000"):
        validation.list_limit(raw)


@pytest.mark.parametrize("raw", ["0", "9223372036854775808", "abc"])
def test_before_cursor_is_a_positive_int64(raw: str) -> None:
    """A cursor is a message id: 1 to 2**63-1."""
    with pytest.raises(errors.InvalidInput, match="before must be an integer"):
        validation.list_before(raw)


@pytest.mark.parametrize("key", ["", "k" * 256, "ключ", "a\tb"])
def test_idempotency_key_refusals(key: str) -> None:
    """1 to 255 printable ASCII characters."""
    with pytest.raises(errors.InvalidInput, match="Idempotency-Key"):
        checks.idempotency_key(key)


def test_registration_checks_dates_and_passwords() -> None:
    """A future birthdate and a short password are refused; a valid body becomes a NewUser."""
    body = {"first_name": "Anna", "second_name": "L", "password": "password-1", "birthdate": "1990-05-17"}
    user = validation.registration(body)
    assert user.birthdate == datetime.date(1990, 5, 17) and user.city == ""
    # Past tomorrow in UTC: the future in every time zone (today somewhere is tomorrow in UTC).
    future = (datetime.datetime.now(datetime.UTC).date() + datetime.timedelta(days=2)).isoformat()
    with pytest.raises(errors.InvalidInput, match="future"):
        validation.registration({**body, "birthdate": future})
    with pytest.raises(errors.InvalidInput, match="at least 8"):
        validation.registration({**body, "password": "short"})


def test_login_needs_a_uuid_and_a_password() -> None:
    """The spec's login body: {id, password}."""
    user_id = uuid.uuid4()
    assert validation.login({"id": str(user_id), "password": "x"}) == (user_id, "x")
    with pytest.raises(errors.InvalidInput, match="id must be a UUID"):
        validation.login({"id": 5, "password": "x"})
    with pytest.raises(errors.InvalidInput, match="password"):
        validation.login({"id": str(user_id)})


def test_patroni_rest_urls_are_plain_host_port_urls_each_once() -> None:
    """Patroni members' REST URLs are published as scrape targets: no user or password, no
    path; a repeated one (also with a trailing slash) is kept once."""
    assert checks.rest_urls(["http://a:8008", "http://a:8008/", "https://b:8008"], "urls") == [
        "http://a:8008",
        "https://b:8008",
    ]
    for bad in (["http://user:pw@a:8008"], ["a:8008"], ["http://a:8008/patroni"], ["ftp://a"], "http://a:8008", [1]):
        with pytest.raises(errors.InvalidInput, match="host:port URLs"):
            checks.rest_urls(bad, "urls")
