"""Helpers for the typed settings each process builds from its environment.

Every process has a frozen ``environ-config`` class (``proxy/settings.py``,
``dialog_api/settings.py``); ``load`` builds it from an explicit mapping and turns every
problem into one ``SettingsError`` that names the variable, so a bad deployment fails at
start-up with a sentence instead of a traceback.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import environ

T = TypeVar("T")


class SettingsError(Exception):
    pass


def load(cls: type[T], env: Mapping[str, str] | None = None) -> T:
    env = dict(os.environ if env is None else env)
    try:
        return environ.to_config(cls, environ=env)
    except environ.MissingEnvValueError as exc:
        raise SettingsError(f"missing required environment variable {exc.args[0]}") from None
    except (ValueError, TypeError) as exc:
        raise SettingsError(str(exc)) from None


def _named(name: str, convert: Callable[[str], Any], kind: str) -> Callable[[Any], Any]:
    def converter(value: Any) -> Any:
        try:
            return convert(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be {kind}, got {value!r}") from None

    return converter


def positive_int(name: str) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        number = int(value)
        if number < 1:
            raise ValueError
        return number

    return _named(name, convert, "a positive integer")


def port(name: str) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        number = int(value)
        if not 0 < number < 65536:
            raise ValueError
        return number

    return _named(name, convert, "a TCP port (1-65535)")


def positive_float(name: str) -> Callable[[Any], float]:
    def convert(value: Any) -> float:
        number = float(value)
        if not number > 0:
            raise ValueError
        return number

    return _named(name, convert, "a positive number")


def internal_secret(_: object, __: object, value: str) -> None:
    if len(value) < 32:
        raise ValueError(
            "DIALOGS_INTERNAL_SECRET must be at least 32 characters (the same on every proxy and worker)"
        )


def dsn(name: str) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if not isinstance(value, str) or not value.startswith(("postgresql://", "postgres://")):
            raise ValueError
        return value

    return _named(name, convert, "a postgresql:// URL")
