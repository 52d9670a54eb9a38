"""Ports for local servers: outside the kernel's ephemeral range, so an outgoing connection
cannot take one between the choice and the bind (a test once failed so)."""

from __future__ import annotations

import socket

import pytest

from dialogsctl.net import PORT_RANGE_VARIABLE, ephemeral_range, free_port, port_spans


def test_a_free_port_is_outside_the_ephemeral_range_and_never_repeated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PORT_RANGE_VARIABLE, raising=False)  # `make test` sets one per test process
    low, high = ephemeral_range()
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(not low <= port <= high and 1024 < port <= 65535 for port in ports), (low, high, ports)
    with socket.socket() as sock:  # free when handed out
        sock.bind(("127.0.0.1", ports[-1]))


def test_a_port_range_keeps_every_port_inside_it(monkeypatch: pytest.MonkeyPatch) -> None:
    low, _ = ephemeral_range()
    monkeypatch.setenv(PORT_RANGE_VARIABLE, f"{low - 400}-{low + 400}")
    ports = [free_port() for _ in range(100)]
    assert len(set(ports)) == len(ports)
    assert all(low - 400 <= port < low for port in ports), ports  # its part below the ephemeral range


def test_a_port_range_inside_the_ephemeral_range_is_the_operators_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    low, high = ephemeral_range()
    middle = (low + high) // 2
    monkeypatch.setenv(PORT_RANGE_VARIABLE, f"{middle}-{middle + 100}")
    assert middle <= free_port() <= middle + 100


def test_a_port_range_is_clipped_to_either_side_of_the_ephemeral_range() -> None:
    low, high = ephemeral_range()
    assert port_spans((low - 1, high + 1)) == [(low - 1, low - 1), (high + 1, high + 1)]  # one port each side
    assert port_spans((low - 100, low + 100)) == [(low - 100, low - 1)]
    assert port_spans((low + 1, low + 100)) == [(low + 1, low + 100)]  # wholly inside: as the operator chose


def test_a_port_range_with_nothing_free_is_an_error_not_a_port_outside_it(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        monkeypatch.setenv(PORT_RANGE_VARIABLE, f"{port}-{port}")
        with pytest.raises(OSError, match="no free port found"):
            free_port()


@pytest.mark.parametrize(
    "value", ["10000", "20000-10000", "80-9000", "10000-70000", "a-b", "10000-", "10_000-20000", " 10000-20000"]
)
def test_a_malformed_port_range_is_refused_by_name(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(PORT_RANGE_VARIABLE, value)
    with pytest.raises(ValueError, match=PORT_RANGE_VARIABLE):
        free_port()
