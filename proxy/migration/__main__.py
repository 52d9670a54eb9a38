"""`python -m proxy.migration` (`dialogs run-migration`): run the active migration here.

Proxies run migrations on their own; this is for running one elsewhere, or with
DIALOGS_MIGRATION_DRIVER=false on every proxy. Exit 0 when it ended (done or aborted), 1
when there was nothing to run, 2 on bad settings.
"""

from __future__ import annotations

import asyncio
import sys

from dialogs import logs
from dialogs.serve import settings_or_exit
from proxy.migration.runner import RunnerSettings, run_active
from proxy.settings import MigrationRunnerSettings


def main() -> int:
    settings = settings_or_exit(MigrationRunnerSettings)
    logs.configure("migration-runner", settings.log_level)
    runner = RunnerSettings(cutover_deadline=settings.cutover_deadline, liveness_ttl=settings.worker_ttl)
    result = asyncio.run(run_active(settings.metadata_dsn, runner))
    if result is None:
        print("nothing to run: no active migration, or another runner holds the lease")
        return 1
    print(f"migration {result.migration_id} ended in phase {result.phase}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
