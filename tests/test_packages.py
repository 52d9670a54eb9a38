"""Installing a Debian package for a test starts no system service, and leaves the machine's policy alone."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.packages import services_held


def test_services_are_held_while_installing(tmp_path: Path) -> None:
    """Without a policy-rc.d, one that refuses every start (exit 101) exists during the install only."""
    policy = tmp_path / "policy-rc.d"
    with services_held(policy):
        assert os.access(policy, os.X_OK)
        assert subprocess.run([str(policy), "prometheus", "start"]).returncode == 101
    assert not policy.exists()


def test_the_machines_policy_is_left_alone(tmp_path: Path) -> None:
    """A policy-rc.d already in place is neither replaced nor removed."""
    policy = tmp_path / "policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 0\n")
    with services_held(policy):
        assert policy.read_text() == "#!/bin/sh\nexit 0\n"
    assert policy.read_text() == "#!/bin/sh\nexit 0\n"
