"""Rules for input values, the same wherever input is checked: the public API (``proxy/validation.py``),
the proxy-worker wire (``dialogs/wire.py``), the admin API and the bootstrap's command line.
Each raises InvalidInput with a sentence."""

from __future__ import annotations

import contextlib
import re
import uuid
from typing import Any

from dialogs import errors
from dialogs.keys import INT64_MAX, INT64_MIN

MAX_IDEMPOTENCY_KEY_LENGTH = 255


def text(value: Any, name: str, max_length: int, *, required: bool = True) -> str:
    """A string PostgreSQL can store: no NUL characters, no lone surrogates; if ``required``,
    not only white space."""
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


def idempotency_key(value: Any, name: str = "Idempotency-Key") -> str | None:
    """None, or 1 to 255 printable ASCII characters."""
    if value is None:
        return None
    if (
        not isinstance(value, str)
        or not 1 <= len(value) <= MAX_IDEMPOTENCY_KEY_LENGTH
        or not value.isascii()
        or not value.isprintable()
    ):
        raise errors.InvalidInput(f"{name} must be 1 to {MAX_IDEMPOTENCY_KEY_LENGTH} printable ASCII characters")
    return value


def bounded_int(value: Any, name: str, low: int, high: int) -> int:
    """An integer from ``low`` to ``high``: an int, or a string of one (a query parameter)."""
    message = f"{name} must be an integer from {low} to {high}"
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise errors.InvalidInput(message)
    try:
        number = int(value)
    except ValueError:
        raise errors.InvalidInput(message) from None
    if not low <= number <= high:
        raise errors.InvalidInput(message)
    return number


def int64(value: Any, name: str) -> int:
    """A 64-bit integer, as an int or a string of one (a query parameter)."""
    return bounded_int(value, name, INT64_MIN, INT64_MAX)


def json_int64(value: Any, name: str) -> int:
    """A 64-bit integer that JSON typed as a number (not a string, not a boolean)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise errors.InvalidInput(f"{name} must be an integer from {INT64_MIN} to {INT64_MAX}")
    return bounded_int(value, name, INT64_MIN, INT64_MAX)


def message_id(value: Any, name: str) -> int:
    """A message id as the API writes them: a string of decimal digits, from 1 to 2**63-1.
    Not a JSON number: JavaScript rounds integers past 2**53, and a rounded id names another
    message (or none)."""
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 19:
        with contextlib.suppress(errors.InvalidInput):
            return bounded_int(value, name, 1, INT64_MAX)
    raise errors.InvalidInput(f"{name} must be a message id (a string of digits, as message ids are written)")


def user_id(value: Any, name: str = "user_id") -> uuid.UUID:
    if not isinstance(value, str):
        raise errors.InvalidInput(f"{name} must be a UUID")
    try:
        return uuid.UUID(value)
    except ValueError:
        raise errors.InvalidInput(f"{name} must be a UUID") from None


# No user or password (``user:pw@``): the URLs are published as scrape targets.
_REST_URL = re.compile(r"https?://[^\s/?#@]+/?")


def rest_urls(value: Any, name: str) -> list[str]:
    """A list of ``http(s)://host:port`` URLs, each a Patroni member's REST API, each once."""
    if not isinstance(value, list) or not all(isinstance(url, str) and _REST_URL.fullmatch(url) for url in value):
        raise errors.InvalidInput(f"{name} must be a list of http(s)://host:port URLs (no user or password)")
    return list(dict.fromkeys(url.rstrip("/") for url in value))
