"""The sharding keys: the unordered pair of participants (a dialog's messages and state)
and one user (the user's inbox, docs/inbox.md), hashed onto the same ring.

Positions on the ring live in the signed 64-bit range so that Python and PostgreSQL
(``bigint``) order them the same way: an unsigned xxh64 digest is shifted down by 2**63,
which keeps the order of the unsigned values.
"""

from __future__ import annotations

import uuid

import xxhash

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1


def position(data: bytes) -> int:
    """Place bytes on the ring: xxh64 (seed 0) shifted into the signed 64-bit range."""
    return xxhash.xxh64_intdigest(data) - 2**63


def dialog_key(user_a: uuid.UUID, user_b: uuid.UUID) -> int:
    """The ring position of the dialog between two users, the same in both directions."""
    low, high = sorted((str(user_a), str(user_b)))
    return position(f"{low}:{high}".encode())


def user_key(user: uuid.UUID) -> int:
    """The ring position of a user's inbox. Prefixed, so that no user's key is by design
    the key of a dialog's text form."""
    return position(f"user:{user}".encode())
