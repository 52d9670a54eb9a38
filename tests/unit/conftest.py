"""The fast layer: pure logic only. A test here that starts a process or opens a network
connection fails at once (it belongs with the tests beside tests/unit, which start what
they need); `make test-fast` runs this layer alone, before the suite."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest


class _NotHere(Exception):
    pass


@pytest.fixture(autouse=True)
def _pure(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def refuse(what: str) -> Any:
        def refused(*args: Any, **kwargs: Any) -> Any:
            raise _NotHere(f"tests/unit is the pure layer: no {what} here")

        return refused

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse("subprocess"))
    monkeypatch.setattr(socket.socket, "connect", refuse("network connection"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("network connection"))
    yield
