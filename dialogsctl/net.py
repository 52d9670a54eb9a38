"""A free TCP port on 127.0.0.1 (its own module: no PostgreSQL wheel is loaded for it)."""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

# Ports below this are left alone (well-known and commonly configured services).
_LOWEST = 10_000
_EPHEMERAL = Path("/proc/sys/net/ipv4/ip_local_port_range")
_handed_out: set[int] = set()
# "LOW-HIGH": the only ports free_port hands out in this process and its children. Processes
# that choose ports side by side (the suite's parallel test processes, two local clusters
# started at once) each take a range of their own: a port one of them has checked but not
# yet bound is then never the other's choice too.
PORT_RANGE_VARIABLE = "DIALOGS_PORT_RANGE"


def ephemeral_range() -> tuple[int, int]:
    """The ports the kernel picks for outgoing connections and for ``bind(("", 0))``."""
    try:
        low, high = (int(part) for part in _EPHEMERAL.read_text().split())
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default
    return low, high


def port_range(value: str | None) -> tuple[int, int] | None:
    """``DIALOGS_PORT_RANGE``'s "LOW-HIGH" as numbers (None when unset), or ValueError."""
    if not value:
        return None
    low, _, high = value.partition("-")
    if low.isdigit() and high.isdigit() and 1024 <= int(low) <= int(high) <= 65535:
        return int(low), int(high)
    raise ValueError(f"{PORT_RANGE_VARIABLE} must be LOW-HIGH with 1024 <= LOW <= HIGH <= 65535, not {value!r}")


def port_spans(chosen: tuple[int, int] | None) -> list[tuple[int, int]]:
    """Where to look: below and above the ephemeral range, within ``chosen`` if given (all of
    ``chosen`` when it lies inside the ephemeral range: the operator's choice stands)."""
    low, high = ephemeral_range()
    if chosen is None:
        return [(start, end) for start, end in ((_LOWEST, low - 1), (high + 1, 65535)) if end - start >= 1000]
    spans = [
        (max(start, chosen[0]), min(end, chosen[1]))
        for start, end in ((1024, low - 1), (high + 1, 65535))
        if max(start, chosen[0]) <= min(end, chosen[1])
    ]
    return spans or [chosen]


def free_port() -> int:
    """A port nothing listens on, outside the kernel's ephemeral range (and within
    ``DIALOGS_PORT_RANGE`` when set), never the same twice in one process.

    A port from ``bind(0)`` is ephemeral: between this call and the caller's own bind, any
    outgoing connection on the machine (a database client, a proxy's) may take it as its
    source port, and the caller's bind fails with "address already in use". A port below
    (or above) that range is never handed out so.
    """
    chosen = port_range(os.environ.get(PORT_RANGE_VARIABLE))
    spans = port_spans(chosen)
    for _ in range(200):
        start, end = random.choice(spans) if spans else (_LOWEST, 65535)
        port = random.randint(start, end)
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    if chosen is not None:
        raise OSError(f"no free port found in {PORT_RANGE_VARIABLE}={chosen[0]}-{chosen[1]}")
    with socket.socket() as sock:  # every try was taken: the kernel's choice, as before
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
