"""Dialog keys: the unordered pair of participants, hashed onto the ring."""

from __future__ import annotations

import uuid

from dialogs.keys import INT64_MAX, INT64_MIN, dialog_key, position

A = uuid.UUID("e4d2e6b0-cde2-42c5-aac3-0b8316f21e58")
B = uuid.UUID("1d535fd6-7521-4cb1-aa6d-031be7123c4d")


def test_both_directions_share_one_key() -> None:
    """A dialog has one key whichever participant asks."""
    assert dialog_key(A, B) == dialog_key(B, A)


def test_golden_values() -> None:
    """Pinned hashes: a change to the hash function or the key format would move every dialog."""
    assert position(b"") == 8018337217222601113
    assert dialog_key(A, B) == -2788901730782733738
    first, second = uuid.UUID(int=1), uuid.UUID(int=2)
    assert dialog_key(first, second) == 4158055675508372863


def test_positions_fit_in_bigint() -> None:
    """Positions are signed 64-bit, the range of PostgreSQL's bigint."""
    for index in range(1000):
        assert INT64_MIN <= position(index.to_bytes(4, "big")) <= INT64_MAX
