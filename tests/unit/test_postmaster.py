"""What to do about a postmaster.pid left in a data directory, from what the OS says about its pid."""

from __future__ import annotations

from pathlib import Path

from dialogsctl.postmaster import Leftover, PidOwner, decide

DATA = Path("/var/lib/dialogs/data/pg-meta-x")


def test_no_file_and_a_gone_pid_need_nothing() -> None:
    """No file, or a pid that no longer exists (PostgreSQL removes such a file itself)."""
    assert decide(None, DATA) is Leftover.NONE
    assert decide(PidOwner(exists=False), DATA) is Leftover.IGNORE


def test_only_a_postgres_on_this_directory_is_stopped() -> None:
    """A live postmaster whose working directory is this data directory is stopped."""
    assert decide(PidOwner(exists=True, name="postgres", cwd=DATA), DATA) is Leftover.STOP


def test_anything_else_alive_is_never_signalled() -> None:
    """A recycled pid (another program, another server's postgres, an unreadable process) or a
    zombie: the file is removed, since PostgreSQL would refuse to start while that pid exists."""
    for owner in (
        PidOwner(exists=True, name="sleep", cwd=DATA),
        PidOwner(exists=True, name="postgres", cwd=Path("/tmp/other-server")),
        PidOwner(exists=True, name="postgres", cwd=None),
        PidOwner(exists=True),
        PidOwner(exists=True, zombie=True),
    ):
        assert decide(owner, DATA) is Leftover.REMOVE, owner
