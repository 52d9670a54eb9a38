"""DSNs of the local servers: passwords URL-quoted, and hidden when shown."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

from dialogsctl.pg_auth import dsn, redacted


def test_password_is_url_quoted() -> None:
    """Any password survives a round trip through the DSN, however many URL delimiters it has."""
    password = "p@ss:w/rd?#%&= x"
    parts = urlsplit(dsn(5432, password, "dialogs"))
    assert unquote(parts.password or "") == password
    assert (parts.username, parts.hostname, parts.port, parts.path) == ("postgres", "127.0.0.1", 5432, "/dialogs")


def test_redacted_hides_only_the_password() -> None:
    """Shown DSNs keep user, host, port, database and query; the password becomes ***."""
    assert redacted(dsn(5432, "s3cret/x", "dialogs") + "?sslmode=disable") == (
        "postgresql://postgres:***@127.0.0.1:5432/dialogs?sslmode=disable"
    )
    assert redacted("postgresql://postgres@127.0.0.1:5432/dialogs") == "postgresql://postgres@127.0.0.1:5432/dialogs"
