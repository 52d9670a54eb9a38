"""Debian packages some tests need (a real Prometheus, docker-compose), installed when missing."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# Debian's hook for "may a package's maintainer script start its service?": exit 101 = no.
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")
_DENY_ALL = "#!/bin/sh\n# Written by the dialogs test suite while it installs a package; removed after.\nexit 101\n"


@contextlib.contextmanager
def services_held(policy: Path = POLICY_RC_D) -> Iterator[None]:
    """No package installed meanwhile starts its service (Prometheus would take :9090).

    The tests run their own instances on free ports, and a test stops only what it started;
    so rather than stopping a service after the fact, none is started. A policy already in
    place is the machine's: it is left as it is.
    """
    if policy.exists():
        yield
        return
    policy.write_text(_DENY_ALL)
    policy.chmod(0o755)
    try:
        yield
    finally:
        policy.unlink(missing_ok=True)


@contextlib.contextmanager
def machine_lock(name: str) -> Iterator[None]:
    """Held by one process of the machine at a time (the suite runs in several)."""
    path = Path(tempfile.gettempdir()) / f"dialogs-tests-{name}.lock"
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure(package: str, *binaries: str) -> None:
    """Install ``package`` with apt-get unless ``binaries`` are on PATH; skip the test if we cannot.

    One install at a time: apt holds a lock of its own, and the policy file is one file."""
    if all(shutil.which(binary) for binary in binaries):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip(f"{package} is not installed (apt-get install {package})")
    with machine_lock("apt"):
        if not all(shutil.which(binary) for binary in binaries):  # another test process may have meanwhile
            _install(package)


def _install(package: str) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True, timeout=300)
    with services_held():
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", package],
            check=True,
            env=env,
            capture_output=True,
            timeout=600,
        )
