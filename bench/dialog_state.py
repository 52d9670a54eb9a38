"""What keeping each dialog's state costs a send: `python -m bench.dialog_state`.

The same group commits (``store_messages``: batches of 16 sends over 2,000 dialogs; 8 and
32 pgbench clients, as a shard's commits come from a few workers at once) against two
databases of one PostgreSQL server (fsync on): one at the current shard schema, which
updates each dialog's state row in the send's transaction (``0006_dialog_state.sql``), and
one at the schema before it (messages only). The ratio is the send path's cost of unread
counts at the database, where all of it is paid (the proxy and the worker do nothing more
per send). Results: stdout and bench/results/dialog_state.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import uuid
from pathlib import Path

import asyncpg

from bench import load
from dialogs import schema
from dialogs.keys import INT64_MAX, INT64_MIN, dialog_key
from dialogs.migration_plan import Span
from dialogsctl.cluster import new_password
from dialogsctl.embedded import LocalPostgres, scratch_folder
from dialogsctl.net import free_port
from proxy.migration import shard_sql

STATE_VERSION = 6  # dialogs/schema/shard/0006_dialog_state.sql
DIALOGS = 2000
BATCH = 16

GROUPS = DIALOGS // BATCH
# A group commit of BATCH sends to preloaded dialogs (one of GROUPS fixed groups, spread
# over the table: two commits at once share their dialogs with probability 1/GROUPS), as
# the worker sends it.
STORE = f"""
\\set g random(0, {GROUPS - 1})
SELECT count(*)
FROM (
    SELECT array_agg(dialog_key) AS keys, array_agg(lo) AS los, array_agg(hi) AS his, array_agg(from_lo) AS froms,
           array_agg('hello, this is a message'::text) AS texts, array_agg(NULL::text) AS idempotency_keys
    FROM bench_dialogs WHERE g = :g
) AS batch,
LATERAL store_messages(batch.keys, batch.los, batch.his, batch.froms, batch.texts, batch.idempotency_keys);
"""


async def prepare(dsn: str, until: int | None) -> None:
    con = await asyncpg.connect(dsn)
    try:
        await schema.upgrade_shard(con, until)
        await shard_sql.set_state(con, [Span(INT64_MIN, INT64_MAX)], "owned")
        await con.execute(
            "CREATE TABLE bench_dialogs (g int, dialog_key bigint, lo uuid, hi uuid, from_lo bool);"
            " CREATE INDEX ON bench_dialogs (g)"
        )
        rows = []
        for i in range(DIALOGS):
            a, b = sorted((uuid.uuid4(), uuid.uuid4()))
            rows.append((i % GROUPS, dialog_key(a, b), a, b, i % 2 == 0))
        await con.copy_records_to_table("bench_dialogs", records=rows)
    finally:
        await con.close()


async def main(seconds: float, clients: list[int]) -> dict[str, object]:
    base = scratch_folder("dialogs-bench-state-")
    server = LocalPostgres(base / "pg", free_port(), password=new_password(), settings={"max_connections": "100"})
    server.start()
    try:
        arms = {"with_state": None, "without_state": STATE_VERSION - 1}
        admin = await asyncpg.connect(server.dsn())
        for name in arms:
            await admin.execute(f"CREATE DATABASE {name}")
        await admin.close()
        for name, until in arms.items():
            await prepare(server.dsn(name), until)
        figures: dict[str, object] = {"batch": BATCH, "dialogs": DIALOGS, "seconds": seconds}
        for count in clients:
            results: dict[str, load.Load] = {}
            # Alternated, twice each (the better run kept): noise falls on both arms alike.
            for _ in range(2):
                for name in arms:
                    run = await asyncio.to_thread(load.pgbench, server.dsn(name), STORE, count, seconds)
                    best = results.get(name)
                    results[name] = run if best is None or run.per_second > best.per_second else best
            figures[f"{count}_clients"] = {
                "sends_per_second": {name: round(run.per_second * BATCH, 1) for name, run in results.items()},
                "ratio_with_to_without": round(
                    results["with_state"].per_second / results["without_state"].per_second, 3
                ),
            }
        return figures
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 32])
    options = parser.parse_args()
    figures = asyncio.run(main(options.seconds, options.clients))
    print(json.dumps(figures, indent=2))
    out = Path(__file__).resolve().parent / "results" / "dialog_state.json"
    out.write_text(json.dumps(figures, indent=2) + "\n")
