"""Typed settings from DIALOGS_* environment variables, declared once with their help text.

Every process has a frozen ``environ-config`` class (``proxy/settings.py``,
``dialog_api/settings.py``) whose fields are declared with the kinds below: each says
its type, its default and a sentence of help. ``load`` builds the class from an explicit
mapping and turns every problem into one ``SettingsError`` naming the variable, so a bad
deployment fails at start-up with a sentence instead of a traceback. The README's
configuration tables are generated from these declarations (``markdown_table``; a test
fails when they drift).

A variable's name is derived from its field (``port`` -> ``DIALOGS_PORT``), never typed
again, so a message can never name the wrong one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import attrs
import environ

from dialogs.pg import dsn_problem

PREFIX = "DIALOGS"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

T = TypeVar("T")
REQUIRED: Any = object()  # no default: the variable must be set


class SettingsError(Exception):
    pass


def variable(field: attrs.Attribute[Any]) -> str:
    return f"{PREFIX}_{field.name.upper()}"


def load(cls: type[T], env: Mapping[str, str] | None = None) -> T:
    env = dict(os.environ if env is None else env)
    try:
        return environ.to_config(cls, environ=env)
    except environ.MissingEnvValueError as exc:
        raise SettingsError(f"missing required environment variable {exc.args[0]}") from None
    except (ValueError, TypeError) as exc:
        raise SettingsError(str(exc)) from None


# --- kinds ---------------------------------------------------------------------------------


def _kind(description: str, parse: Callable[[Any], Any], *, secret: bool = False) -> attrs.Converter[Any, Any]:
    """A converter that names the variable and what it must be; a refused secret's value is
    never repeated (a real one a character short would end up in the logs), only its length."""

    def convert(value: Any, field: attrs.Attribute[Any]) -> Any:
        try:
            return parse(value)
        except (TypeError, ValueError):
            got = f"{len(value)} characters" if secret and isinstance(value, str) else repr(value)
            raise ValueError(f"{variable(field)} must be {description}, got {got}") from None

    return attrs.Converter(convert, takes_field=True)


def _bounded(number: Any, low: float, high: float = float("inf")) -> Any:
    if not low <= number <= high:
        raise ValueError
    return number


def _var(default: Any, converter: Any, help: str) -> Any:
    if default is REQUIRED:
        return environ.var(converter=converter, help=help)
    return environ.var(default, converter=converter, help=help)


def positive_int(default: Any = REQUIRED, *, help: str, at_most: int | None = None) -> Any:
    if at_most is None:
        return _var(default, _kind("a positive integer", lambda v: _bounded(int(v), 1)), help)
    return _var(default, _kind(f"an integer from 1 to {at_most}", lambda v: _bounded(int(v), 1, at_most)), help)


def count(default: Any = REQUIRED, *, help: str) -> Any:
    """A whole number, 0 or more (0 usually meaning 'automatic': the help says what)."""
    return _var(default, _kind("a whole number, 0 or more", lambda v: _bounded(int(v), 0)), help)


def non_negative_float(default: Any = REQUIRED, *, help: str) -> Any:
    """A number of seconds, 0 or more (0 usually meaning 'off': the help says what)."""
    return _var(default, _kind("a number, 0 or more", lambda v: _bounded(float(v), 0)), help)


def positive_float(default: Any = REQUIRED, *, help: str) -> Any:
    return _var(default, _kind("a positive number", lambda v: _bounded(float(v), 1e-9)), help)


def port(default: Any = REQUIRED, *, help: str) -> Any:
    return _var(default, _kind("a TCP port (1-65535)", lambda v: _bounded(int(v), 1, 65535)), help)


def text(default: Any = REQUIRED, *, help: str) -> Any:
    return _var(default, None, help)


def flag(default: bool, *, help: str) -> Any:
    return environ.bool_var(default, help=help)


def dsn(*, help: str) -> Any:
    """A required PostgreSQL URL. Its password must be URL-encoded (``%40`` for ``@``);
    a bad one is named without echoing the value (it holds a password)."""

    def convert(value: Any, field: attrs.Attribute[Any]) -> str:
        problem = dsn_problem(value)
        if problem is not None:
            raise ValueError(f"{variable(field)} {problem}")
        return value

    return _var(REQUIRED, attrs.Converter(convert, takes_field=True), help)


def secret(min_length: int, default: Any = REQUIRED, *, help: str, empty_ok: bool = False) -> Any:
    def check(value: str) -> str:
        if not (empty_ok and value == "") and len(value) < min_length:
            raise ValueError
        return value

    what = f"at least {min_length} characters" + (", or empty" if empty_ok else "")
    return _var(default, _kind(what, check, secret=True), help)


def log_level(default: str = "INFO") -> Any:
    def check(value: Any) -> str:
        level = str(value).upper()
        if level not in LOG_LEVELS:
            raise ValueError
        return level

    return _var(default, _kind(f"one of {', '.join(LOG_LEVELS)}", check), "log level of this process")


def converted(parse: Callable[[Any], Any], description: str, default: Any = REQUIRED, *, help: str) -> Any:
    """A kind of one's own: ``parse`` raises ValueError for what it refuses."""
    return _var(default, _kind(description, parse), help)


# --- documentation -----------------------------------------------------------------------


def markdown_table(cls: type) -> str:
    """The README table of ``cls``'s variables: name, default (or "required"), help."""
    return environ.generate_help(cls, formatter=_table)


def _table(entries: list[dict[str, Any]]) -> str:
    rows = ["| Variable | Default | |", "|---|---|---|"]
    for entry in entries:
        if entry["required"]:
            shown = "required"
        elif entry["default"] == "":
            shown = "empty"
        else:
            default = entry["default"]
            shown = f"`{str(default).lower() if isinstance(default, bool) else default}`"
        rows.append(f"| `{entry['var_name']}` | {shown} | {entry.get('help_str', '')} |")
    return "\n".join(rows)
