"""Parse and check public API input. Everything here raises InvalidInput with a sentence."""

from __future__ import annotations

import datetime
import uuid
from typing import Any

from dialogs import checks, errors, wire
from dialogs.checks import text, user_id  # the rules the proxy-worker wire checks too
from dialogs.keys import INT64_MAX
from dialogs.metastore.users import NewUser

MAX_NAME_LENGTH = 100
MAX_PROFILE_TEXT_LENGTH = 4096
MIN_PASSWORD_LENGTH = 8
MAX_PASSWORD_LENGTH = 256


def json_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise errors.InvalidInput("request body must be a JSON object")
    return body


def send_text(body: Any, max_length: int) -> str:
    return text(json_object(body).get("text"), "text", max_length)


def read_up_to(body: Any) -> int | None:
    """A read mark's ``up_to`` (a message id); None: up to the newest message (no body,
    an empty object, or null). Any other field is refused: a misspelt ``up_to`` would
    otherwise mark the whole dialog read."""
    data = json_object(body)
    unknown = sorted(str(key) for key in data if key != "up_to")
    if unknown:
        raise errors.InvalidInput(f"unknown field(s) {', '.join(unknown)}: a read mark takes only up_to")
    up_to = data.get("up_to")
    return None if up_to is None else checks.message_id(up_to, "up_to")


def list_limit(raw: str | None) -> int:
    if raw is None:
        return wire.DEFAULT_LIST_LIMIT
    return checks.bounded_int(raw, "limit", 1, wire.MAX_LIST_LIMIT)


def list_before(raw: str | None) -> int:
    """The ``before`` cursor: a message id from an earlier page; only older messages follow
    (none given: from the newest)."""
    if raw is None:
        return INT64_MAX
    return checks.bounded_int(raw, "before", 1, INT64_MAX)


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
    limit = checks.bounded_int(query.get("limit", str(wire.DEFAULT_LIST_LIMIT)), "limit", 1, wire.MAX_LIST_LIMIT)
    return names[0], names[1], limit
