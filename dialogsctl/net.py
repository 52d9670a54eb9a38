"""A free TCP port on 127.0.0.1 (its own module: no PostgreSQL wheel is loaded for it)."""

from __future__ import annotations

import random
import socket
from pathlib import Path

# Ports below this are left alone (well-known and commonly configured services).
_LOWEST = 10_000
_EPHEMERAL = Path("/proc/sys/net/ipv4/ip_local_port_range")
_handed_out: set[int] = set()


def ephemeral_range() -> tuple[int, int]:
    """The ports the kernel picks for outgoing connections and for ``bind(("", 0))``."""
    try:
        low, high = (int(part) for part in _EPHEMERAL.read_text().split())
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default
    return low, high


def free_port() -> int:
    """A port nothing listens on, outside the kernel's ephemeral range, never the same twice
    in one process.

    A port from ``bind(0)`` is ephemeral: between this call and the caller's own bind, any
    outgoing connection on the machine (a database client, a proxy's) may take it as its
    source port, and the caller's bind fails with "address already in use". A port below
    (or above) that range is never handed out so.
    """
    low, high = ephemeral_range()
    spans = [(start, end) for start, end in ((_LOWEST, low - 1), (high + 1, 65535)) if end - start >= 1000]
    for _ in range(200):
        start, end = random.choice(spans) if spans else (_LOWEST, 65535)
        port = random.randint(start, end)
        if port in _handed_out or (spans and low <= port <= high):
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket() as sock:  # every try was taken: the kernel's choice, as before
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
