"""What may still run on a PostgreSQL data directory before we start a server on it.

Two things can block a start, as found by experiment on PostgreSQL 18:

- ``postmaster.pid`` names a process. If that pid is gone, PostgreSQL treats the file as
  stale and starts. If the pid exists and can be signalled by the server's user (a zombie
  postmaster nobody reaped, or an unrelated process that got the pid later), PostgreSQL
  refuses ("lock file already exists"). Only a live postmaster *on this data directory* may
  be stopped; a recycled pid is never signalled: its file is removed instead.
- After a postmaster is killed (kill -9), its backends live on as orphans until they next
  notice, which for a long query is when it ends; while one is attached to the old shared
  memory, a new postmaster refuses ("pre-existing shared memory block is still in use").
  They are given a grace period, then terminated (SIGQUIT: a backend's immediate exit),
  then killed.

A process counts as "on this data directory" when it is named ``postgres`` and its working
directory is that directory (every postmaster and backend chdirs there).
"""

from __future__ import annotations

import enum
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

# Seconds orphaned backends get to notice their postmaster died and exit on their own.
ORPHAN_GRACE = 5.0
# Seconds a stopped leftover postmaster gets for a fast shutdown before it is killed.
LEFTOVER_STOP_TIMEOUT = 30.0


class Leftover(enum.Enum):
    NONE = "no pid file"
    IGNORE = "the pid is gone: PostgreSQL itself ignores such a file"
    REMOVE = "the pid is not a live postmaster on this directory: the stale file would block the start"
    STOP = "a postmaster is still running on this directory"


@dataclass(frozen=True)
class PidOwner:
    """What the OS says about the pid in ``postmaster.pid``."""

    exists: bool
    zombie: bool = False
    name: str | None = None
    cwd: Path | None = None  # None when unreadable (another user's process)


def decide(owner: PidOwner | None, datadir: Path) -> Leftover:
    """What to do about ``postmaster.pid`` before starting a server on ``datadir``."""
    if owner is None:
        return Leftover.NONE
    if not owner.exists:
        return Leftover.IGNORE
    if owner.zombie:
        return Leftover.REMOVE
    if owner.name == "postgres" and owner.cwd == datadir:
        return Leftover.STOP
    return Leftover.REMOVE


def read_pid(datadir: Path) -> int | None:
    """The postmaster pid recorded in ``datadir``, or None (no file, or not a pid file)."""
    try:
        first = (datadir / "postmaster.pid").read_text().split("\n", 1)[0].strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return int(first) if first.isdigit() else None


def observe(pid: int) -> tuple[PidOwner, psutil.Process | None]:
    """What the OS says about ``pid``, and the process to signal if it comes to that (psutil
    checks it is still the same process, not a pid reused meanwhile, before signalling)."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return PidOwner(exists=True, zombie=True), None
        name = process.name()
    except psutil.NoSuchProcess:
        return PidOwner(exists=False), None
    except psutil.AccessDenied:
        return PidOwner(exists=True), None
    try:
        cwd: Path | None = Path(process.cwd())
    except (psutil.AccessDenied, psutil.ZombieProcess, psutil.NoSuchProcess):
        cwd = None
    return PidOwner(exists=True, name=name, cwd=cwd), process


def clear_leftover(datadir: Path) -> Leftover:
    """Make ``postmaster.pid`` no obstacle: stop the postmaster it names, or drop a stale file."""
    pid = read_pid(datadir)
    owner, process = observe(pid) if pid is not None else (None, None)
    verdict = decide(owner, datadir)
    if verdict is Leftover.REMOVE:
        (datadir / "postmaster.pid").unlink(missing_ok=True)
    elif verdict is Leftover.STOP:
        assert process is not None
        _stop(process, LEFTOVER_STOP_TIMEOUT)
    return verdict


def _stop(process: psutil.Process, timeout: float) -> None:
    """Fast shutdown of a leftover postmaster (it stops its backends), SIGKILL if it hangs."""
    try:
        process.send_signal(signal.SIGINT)
        process.wait(timeout)
    except psutil.NoSuchProcess:
        pass
    except psutil.TimeoutExpired:
        process.kill()


def processes_on(datadir: Path) -> list[psutil.Process]:
    """Every ``postgres`` process whose working directory is ``datadir``."""
    found = []
    for process in psutil.process_iter(["name"]):
        if process.info["name"] != "postgres":
            continue
        try:
            if Path(process.cwd()) == datadir:
                found.append(process)
        except (psutil.AccessDenied, psutil.ZombieProcess, psutil.NoSuchProcess):
            continue
    return found


def end_orphans(datadir: Path, grace: float = ORPHAN_GRACE) -> int:
    """Wait for backends of a dead postmaster on ``datadir`` to exit; terminate them after
    ``grace`` seconds, kill them 3 s later. Call only when no postmaster runs there. Returns
    how many there were."""
    orphans = processes_on(datadir)
    if not orphans:
        return 0
    count = len(orphans)
    _, alive = psutil.wait_procs(orphans, timeout=grace)
    for sig, wait in ((signal.SIGQUIT, 3.0), (signal.SIGKILL, 5.0)):
        if not alive:
            break
        for process in alive:
            try:
                process.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(alive, timeout=wait)
    deadline = time.monotonic() + 1.0
    while processes_on(datadir) and time.monotonic() < deadline:
        time.sleep(0.05)
    return count
