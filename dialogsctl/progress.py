"""Follow a migration in the terminal: a live progress bar until it ends."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from dialogs.wire import FINISHED_PHASES
from dialogsctl.admin_client import AdminClient

FINISHED = tuple(FINISHED_PHASES)


def describe(migration: dict[str, Any]) -> str:
    return (
        f"migration {migration['migration_id']}: {migration['kind']} {migration['shard_id']},"
        f" map {migration['from_version']} -> {migration['to_version']}, phase {migration['phase']}"
    )


def follow(client: AdminClient, migration_id: int, console: Console, poll: float = 0.25) -> dict[str, Any]:
    """Show phase, ranges and rows copied, rows remaining and elapsed time until the migration ends."""
    migration = client.migration(migration_id)
    columns = (
        TextColumn("[bold]{task.fields[phase]:<9}"),
        BarColumn(),
        TextColumn("ranges {task.fields[ranges]}"),
        TextColumn("rows {task.completed:,.0f}/{task.fields[total_text]}"),
        TextColumn("remaining {task.fields[remaining]:,}"),
        TextColumn("catch-up {task.fields[delta]:,}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(
            "migration", total=None, phase="", ranges="", remaining=0, delta=0, total_text="counting…"
        )
        while True:
            finished = migration["phase"] in FINISHED
            copied, counted = migration["rows_copied"], migration["rows_total"]
            # The total is counted while the migration prepares (until then the bar pulses),
            # and rows written meanwhile are copied too: the bar's total grows to meet them,
            # and a migration that is done shows what it copied, all of it.
            if migration["phase"] == "done":
                total: int | None = copied
            elif migration["phase"] == "prepare":
                total = max(counted, copied) or None  # not counted yet
            else:
                total = max(counted, copied)
            progress.update(
                task,
                total=total,
                completed=copied,
                phase=migration["phase"],
                ranges=f"{migration['ranges_copied']}/{migration['ranges_total']}",
                remaining=migration["rows_remaining"],
                total_text="counting…" if total is None else f"{total:,}",
                delta=migration["delta_copied"],
            )
            if finished:
                break
            time.sleep(poll)
            migration = client.migration(migration_id)
    pause = migration.get("last_pause_ms")
    summary = describe(migration)
    if pause is not None:
        summary += f"; write pause at cutover {pause:.0f} ms"
    if migration.get("error"):
        summary += f"; {migration['error']}"
    console.print(summary, highlight=False)
    return migration
