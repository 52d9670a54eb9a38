"""Ports for local servers: outside the kernel's ephemeral range, so an outgoing connection
cannot take one between the choice and the bind (a test once failed so)."""

from __future__ import annotations

import socket

from dialogsctl.net import ephemeral_range, free_port


def test_a_free_port_is_outside_the_ephemeral_range_and_never_repeated() -> None:
    low, high = ephemeral_range()
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(not low <= port <= high and 1024 < port <= 65535 for port in ports), (low, high, ports)
    with socket.socket() as sock:  # free when handed out
        sock.bind(("127.0.0.1", ports[-1]))
