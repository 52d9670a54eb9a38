"""Parse and check public API input. Everything here raises InvalidInput with a sentence."""

from __future__ import annotations

import datetime
import uuid
from typing import Any

from dialogs import errors
from dialogs.keys import INT64_MAX
from dialogs.metastore.users import NewUser

DEFAULT_LIST_LIMIT = 100
MAX_LIST_LIMIT = 1000
MAX_NAME_LENGTH = 100
MAX_PROFILE_TEXT_LENGTH = 4096
MAX_IDEMPOTENCY_KEY_LENGTH = 255
MIN_PASSWORD_LENGTH = 8
MAX_PASSWORD_LENGTH = 256


def user_id(value: str, name: str = "user_id") -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except (ValueError, TypeError, AttributeError):
        raise errors.InvalidInput(f"{name} must be a UUID") from None


def text(value: Any, name: str, max_length: int, *, required: bool = True) -> str:
    """A string PostgreSQL can store: no NUL characters, no lone surrogates."""
    if value is None:
        if required:
            raise errors.InvalidInput(f"{name} is required")
        return ""
    if not isinstance(value, str):
        raise errors.InvalidInput(f"{name} must be a string")
    if required and not value.strip():
        raise errors.InvalidInput(f"{name} must not be empty")
    if len(value) > max_length:
        raise errors.InvalidInput(f"{name} must be at most {max_length} characters")
    if "\x00" in value:
        raise errors.InvalidInput(f"{name} must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise errors.InvalidInput(f"{name} must be valid Unicode") from None
    return value


def json_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise errors.InvalidInput("request body must be a JSON object")
    return body


def send_text(body: Any, max_length: int) -> str:
    return text(json_object(body).get("text"), "text", max_length)


def idempotency_key(value: str | None) -> str | None:
    if value is None:
        return None
    if not 1 <= len(value) <= MAX_IDEMPOTENCY_KEY_LENGTH or not value.isascii() or not value.isprintable():
        raise errors.InvalidInput(
            f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_LENGTH} printable ASCII characters"
        )
    return value


def _bounded_int(raw: str, name: str, low: int, high: int) -> int:
    try:
        number = int(raw)
    except ValueError:
        raise errors.InvalidInput(f"{name} must be an integer from {low} to {high}") from None
    if not low <= number <= high:
        raise errors.InvalidInput(f"{name} must be an integer from {low} to {high}")
    return number


def list_limit(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_LIST_LIMIT
    return _bounded_int(raw, "limit", 1, MAX_LIST_LIMIT)


def list_before(raw: str | None) -> int | None:
    """The ``before`` cursor: a message id from an earlier page; only older messages follow."""
    if raw is None:
        return None
    return _bounded_int(raw, "before", 1, INT64_MAX)


def registration(body: Any) -> NewUser:
    data = json_object(body)
    birthdate = data.get("birthdate")
    if birthdate is not None:
        if not isinstance(birthdate, str):
            raise errors.InvalidInput("birthdate must be a date (YYYY-MM-DD)")
        try:
            birthdate = datetime.date.fromisoformat(birthdate)
        except ValueError:
            raise errors.InvalidInput("birthdate must be a date (YYYY-MM-DD)") from None
        if birthdate > datetime.datetime.now(datetime.UTC).date() + datetime.timedelta(days=1):  # any time zone's today
            raise errors.InvalidInput("birthdate must not be in the future")
    password = text(data.get("password"), "password", MAX_PASSWORD_LENGTH)
    if len(password) < MIN_PASSWORD_LENGTH:
        raise errors.InvalidInput(f"password must be at least {MIN_PASSWORD_LENGTH} characters")
    if "second_name" not in data and "last_name" in data:
        raise errors.InvalidInput(
            "second_name is required (the spec's name for the family name; last_name is only"
            " a parameter of /user/search)"
        )
    return NewUser(
        first_name=text(data.get("first_name"), "first_name", MAX_NAME_LENGTH),
        second_name=text(data.get("second_name"), "second_name", MAX_NAME_LENGTH),
        birthdate=birthdate,
        biography=text(data.get("biography"), "biography", MAX_PROFILE_TEXT_LENGTH, required=False),
        city=text(data.get("city"), "city", MAX_NAME_LENGTH, required=False),
        password=password,
    )


def login(body: Any) -> tuple[uuid.UUID, str]:
    data = json_object(body)
    raw_id = data.get("id")
    if raw_id is None:
        raise errors.InvalidInput("id is required")
    if not isinstance(raw_id, str):
        raise errors.InvalidInput("id must be a UUID")
    # The rules registration applies: a password that could not be registered (a lone
    # surrogate, a NUL, too long) is refused here too, before it reaches the hasher.
    password = text(data.get("password"), "password", MAX_PASSWORD_LENGTH)
    return user_id(raw_id, "id"), password


def search(query: Any) -> tuple[str, str, int]:
    names = []
    for name in ("first_name", "last_name"):
        if name not in query:
            raise errors.InvalidInput(f"{name} is required")
        names.append(text(query[name], name, MAX_NAME_LENGTH, required=False))
    limit = _bounded_int(query.get("limit", str(DEFAULT_LIST_LIMIT)), "limit", 1, MAX_LIST_LIMIT)
    return names[0], names[1], limit
