"""Debian packages some tests need (a real Prometheus, docker-compose), installed when missing."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest


def ensure(package: str, *binaries: str) -> None:
    """Install ``package`` with apt-get unless ``binaries`` are on PATH; skip the test if we cannot."""
    if all(shutil.which(binary) for binary in binaries):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip(f"{package} is not installed (apt-get install {package})")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True, timeout=300)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", package],
                   check=True, env=env, capture_output=True, timeout=600)
