"""The migration runner: drives the active migration through its phases, resumable anywhere.

One runner at a time holds the lease: a session advisory lock on its own metadata
connection, which PostgreSQL releases the moment that connection dies (also on kill -9),
so another proxy's driver or a restarted `dialogs run-migration` picks the work up.
Every phase is safe to run again from its start; docs/resharding.md argues each one.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import asyncpg

from dialogs import errors, inbox, pg, schema
from dialogs.metastore import maps, members, migrations
from dialogs.metastore.migrations import START, Migration, RangeCopy, Watermark
from dialogs.migration_plan import MovePlan, Span, owned_after_split, same_database, target_problem
from dialogs.wire import ABSENT, Ownership, Phase
from proxy.migration import pacing, shard_sql
from proxy.migration.verification import (
    DIALOG_ROUNDS,
    MAX_VERIFY_ROUNDS,
    CutoverBudget,
    Verified,
    rounds_done,
    without,
)

log = logging.getLogger(__name__)

# Settings of the runner's sessions on the shards (with its lock_timeout).
# - client_connection_check_interval: a statement whose connection this runner closed (a
#   deadline) notices while it waits, and gives up its place in the fence's queue instead
#   of freezing ranges later.
# - enable_seqscan off: every statement of a migration reads ranges of keys that lead an
#   index, but the planner cannot see how narrow a range given as an array element is
#   (``unnest(lo[], hi[]) JOIN … BETWEEN r.lo AND r.hi``), and on a large table it chose a
#   parallel scan of the whole table for each copy step: adding a shard over 10,000,000
#   messages per shard read all of them for every 5,000 rows copied (bench/growth.py).
#   PostgreSQL still scans a table that has no usable index; it only prefers one that has.
SHARD_SESSION = {"client_connection_check_interval": "250ms", "enable_seqscan": "off"}


async def _upgrade(con: asyncpg.Connection) -> None:
    """``schema.upgrade_shard`` with the planner free to scan: an upgrade's backfills read
    whole tables (SHARD_SESSION keeps it on the indexes otherwise)."""
    await con.execute("SET enable_seqscan = on")
    await schema.upgrade_shard(con)
    await con.execute("SET enable_seqscan = off")


CUTOVER_BACKLOG = 200  # catch up until at most this many delta rows remain, then cut over
MAX_STALLED_ROUNDS = 20  # ...or until the backlog has stopped shrinking for this many rounds
MAX_CUTOVER_ATTEMPTS = 5
DELTA_BATCH = 5000
FLIP_CONFIRM_SLICE = 10.0  # seconds between warnings while the flip waits for the metadata standby


class _Interrupted(Exception):
    """The operator asked to abort: leave the phase, the loop will enter 'aborting'."""


async def _inbox_digests(
    con: asyncpg.Connection, spans: list[Span], keys: list[inbox.RowKey]
) -> tuple[shard_sql.Digests, tuple[int, int]]:
    return await shard_sql.inbox_range_digests(con, spans), await shard_sql.inbox_key_digest(con, keys)


class _VerificationFailed(Exception):
    pass


class _LeaseLost(Exception):
    """A source's lease on its frozen ranges ran out before the hand-over."""


# A cutover that fails before the flip: the ranges go back to the sources.
_CUTOVER_FAILED: tuple[type[BaseException], ...] = (_VerificationFailed, _LeaseLost, *pg.FAILURES)


@dataclass
class _Frozen:
    """What the freeze returned, per source: the last delta rows, when its lease ends (its
    clock), and how far its delta log is copied once those rows are."""

    rows: dict[str, list[asyncpg.Record]] = field(default_factory=dict)
    states: dict[str, list[asyncpg.Record]] = field(default_factory=dict)  # the rows' dialogs' states
    lease_ends: dict[str, datetime.datetime] = field(default_factory=dict)
    watermarks: dict[str, Watermark] = field(default_factory=dict)


@dataclass
class Observer:
    """Where the runner reports progress (the proxy's metrics); no-ops by default."""

    phase: Callable[[str], None] = lambda phase: None
    rows: Callable[[int, int], None] = lambda copied, remaining: None
    cutover: Callable[[float, bool], None] = lambda seconds, ok: None


@dataclass
class RunnerSettings:
    """What the runner needs of its process's settings (``proxy/settings.py`` declares them)."""

    cutover_deadline: float
    liveness_ttl: float
    poll_interval: float = 0.5
    observer: Observer = field(default_factory=Observer)


async def run_active(metadata_dsn: str, settings: RunnerSettings) -> Migration | None:
    """Run the active migration to its end if this process gets the lease.

    None when there is nothing to do or another runner holds the lease.
    """
    lease = await pg.connect(metadata_dsn)
    try:
        if not await migrations.take_lease(lease):
            return None
        migration = await migrations.active(lease)
        if migration is None:
            return None
        log.info(
            "running migration %s (%s %s) from phase %s",
            migration.migration_id,
            migration.kind,
            migration.shard_id,
            migration.phase,
        )
        return await _Run(lease, migration, settings).run()
    finally:
        await lease.close()


class _Run:
    def __init__(self, meta: asyncpg.Connection, migration: Migration, settings: RunnerSettings) -> None:
        self.meta = meta
        self.migration = migration
        self.settings = settings
        self.observer = settings.observer
        self.ranges: list[RangeCopy] = []
        self.pools: dict[str, asyncpg.Pool] = {}
        self.plan = MovePlan([])  # set once the moves are read (run)
        # Whether this run itself put the targets' ranges in 'incoming' (a resumed run
        # cannot know what a crashed cutover left, so it resets them).
        self._targets_incoming = False
        # Pre-verification, in memory: a resumed run has verified nothing and checks all.
        self.verified = Verified()
        self._checked_at_cutover = (0, 0)  # (ranges digested whole, single dialogs), for the log
        # How far each source's inbox log is copied; None until this run copied the moving
        # inbox rows whole (a resumed run copies them again: rows are values, see _copy_inbox).
        self._inbox_seq: dict[str, Watermark] | None = None
        # The inbox's pre-verification before the freeze: the heads it started from, and the
        # spans of each (source, target) that still differed (None: not done in this run).
        self._inbox_checked: tuple[dict[str, Watermark], dict[tuple[str, str], list[Span]]] | None = None

    def _on(self, shard_id: str) -> contextlib.AbstractAsyncContextManager[asyncpg.Connection]:
        """A connection to one shard; one whose statement was cut short is closed (``pg.pooled``)."""
        return pg.pooled(self.pools[shard_id], self.settings.cutover_deadline)

    async def _best_effort(self, what: str, step: Awaitable[object]) -> bool:
        """Run ``step`` within a cutover deadline; log instead of raising if it cannot finish."""
        try:
            async with asyncio.timeout(self.settings.cutover_deadline):
                await step
            return True
        except pg.FAILURES as exc:  # TimeoutError included
            log.warning("migration %s: could not %s: %s", self.migration.migration_id, what, exc or type(exc).__name__)
            return False

    async def _set(self, state: str, shards: list[str], spans_of: Callable[[str], list[Span]]) -> None:
        """Give each shard's spans ``state``, on all shards at once (one round trip each)."""

        async def one(shard_id: str) -> None:
            spans = spans_of(shard_id)
            if spans:
                async with self._on(shard_id) as con:
                    await shard_sql.set_state(con, spans, state)

        await asyncio.gather(*(one(shard_id) for shard_id in shards))

    async def run(self) -> Migration:
        self.ranges = await migrations.ranges(self.meta, self.migration.migration_id)
        self.plan = MovePlan([r.move for r in self.ranges])  # the moves never change; their checkpoints do
        dsns = await maps.shard_dsns(self.meta)
        try:
            for shard_id in sorted(set(self.plan.sources) | set(self.plan.targets)):
                # lock_timeout bounds how long a statement of a runner that died while it
                # waited can linger and still commit (a new runner's changes queue behind it).
                # min_size=0: nothing connects until used, so a shard that is gone fails only
                # the steps that need it (an abort restores the sources without a lost target).
                self.pools[shard_id] = await pg.create_pool(
                    dsns[shard_id],
                    min_size=0,
                    max_size=4,
                    timeout=self.settings.cutover_deadline,
                    server_settings={
                        "lock_timeout": f"{int(self.settings.cutover_deadline * 1000)}ms",
                        **SHARD_SESSION,
                    },
                )
            return await self._phases()
        finally:
            for pool in self.pools.values():
                await pool.close()

    async def _phases(self) -> Migration:
        steps = {
            Phase.PREPARE: self._prepare,
            Phase.COPY: self._copy,
            Phase.CATCHUP: self._catchup,
            Phase.CUTOVER: self._cutover,
            Phase.CLEANUP: self._cleanup,
            Phase.ABORTING: self._abort,
        }
        while True:
            migration = await self._reload()
            self.observer.phase(migration.phase)
            if migration.phase.finished:
                log.info("migration %s %s", migration.migration_id, migration.phase)
                return migration
            if migration.abort_requested and migration.phase.abortable:
                await migrations.set_phase(self.meta, migration.migration_id, Phase.ABORTING, "aborted by the operator")
                continue
            try:
                await steps[migration.phase](migration)
            except _Interrupted:
                continue

    async def _reload(self) -> Migration:
        migration = await migrations.get(self.meta, self.migration.migration_id)
        assert migration is not None
        self.migration = migration
        return migration

    async def _check_abort(self) -> Migration:
        migration = await self._reload()
        if migration.abort_requested and migration.phase.abortable:
            raise _Interrupted()
        return migration

    # --- prepare: sources log writes to moving ranges, targets expect them ---------------

    async def _prepare(self, migration: Migration) -> None:
        active = await maps.active_map(self.meta)
        old = await maps.shard_map_version(self.meta, migration.from_version)
        if active is None or old is None or active.map_version != migration.from_version:
            await migrations.set_phase(
                self.meta, migration.migration_id, Phase.ABORTING, "the shard map changed before the migration started"
            )
            return
        problem = await self._new_shard_problem(migration)
        if problem is not None:
            await migrations.set_phase(self.meta, migration.migration_id, Phase.ABORTING, problem)
            return
        for shard_id in self.plan.targets:
            async with self._on(shard_id) as con:
                await _upgrade(con)
        await self._set(Ownership.INCOMING, self.plan.targets, self.plan.arriving)
        self._targets_incoming = True
        estimates: dict[int, int] = {}
        for shard_id in self.plan.sources:
            async with self._on(shard_id) as con:
                await shard_sql.clear_delta(con)
                kept = owned_after_split(old.ring, shard_id, self.plan.moves)
                await shard_sql.fenced(con, kept, {Ownership.MIGRATING: self.plan.leaving(shard_id)})
                estimates.update(await shard_sql.span_counts(con, self.plan.leaving(shard_id)))
        await migrations.set_estimates(self.meta, migration.migration_id, estimates)
        self.ranges = await migrations.ranges(self.meta, migration.migration_id)
        await migrations.set_phase(self.meta, migration.migration_id, Phase.COPY)

    # --- copy: the initial pass, checkpointed per batch -----------------------------------

    async def _copy(self, migration: Migration) -> None:
        pending = [r for r in self.ranges if not r.copied]
        pairs: dict[tuple[str, str], list[RangeCopy]] = {}
        for state in pending:
            pairs.setdefault((state.move.source, state.move.target), []).append(state)
        for (source, target), states in pairs.items():
            async with self._on(source) as src, self._on(target) as tgt:
                await self._forget_uncheckpointed(tgt, states)
                await self._copy_pair(src, tgt, states)
        self.ranges = await migrations.ranges(self.meta, migration.migration_id)
        await migrations.set_phase(self.meta, migration.migration_id, Phase.CATCHUP)

    async def _forget_uncheckpointed(self, tgt: asyncpg.Connection, states: list[RangeCopy]) -> None:
        """A crash may have committed a batch on the target without its checkpoint: drop those rows.

        Only the initial pass writes here before catch-up starts, so every target row past
        a range's checkpoint came from such a batch and is copied again below.
        """
        await shard_sql.delete_spans(tgt, [s.move.span for s in states if s.cursor is None])
        for state in (s for s in states if s.cursor is not None):
            await shard_sql.delete_after(tgt, state.move.span, state.cursor)

    async def _copy_pair(self, src: asyncpg.Connection, tgt: asyncpg.Connection, states: list[RangeCopy]) -> None:
        for batch in pacing.copy_batches(states, self.migration.batch_size):
            if batch.in_steps:
                await self._copy_large(src, tgt, batch.ranges[0])
            else:
                await self._flush(src, tgt, batch.ranges)

    async def _flush(self, src: asyncpg.Connection, tgt: asyncpg.Connection, chunk: Sequence[RangeCopy]) -> None:
        started = time.monotonic()
        rows = await shard_sql.copy_rows(src, tgt, [s.move.span for s in chunk])
        await migrations.checkpoint(
            self.meta, self.migration.migration_id, [s.move.lo for s in chunk], None, True, rows
        )
        await self._after_batch(rows, started)

    async def _copy_large(self, src: asyncpg.Connection, tgt: asyncpg.Connection, state: RangeCopy) -> None:
        cursor = state.cursor
        while True:
            migration = await self._check_abort()
            started = time.monotonic()
            end = await shard_sql.batch_end(src, state.move.span, cursor, migration.batch_size)
            rows = await shard_sql.copy_rows(src, tgt, [state.move.span], after=cursor, until=end)
            finished = end is None
            await migrations.checkpoint(self.meta, migration.migration_id, [state.move.lo], end, finished, rows)
            await self._after_batch(rows, started)
            if finished:
                return
            cursor = end

    async def _after_batch(self, rows: int, started: float) -> None:
        migration = await self._check_abort()
        self.observer.rows(migration.rows_copied, max(migration.rows_total - migration.rows_copied, 0))
        await asyncio.sleep(pacing.pause_after(rows, time.monotonic() - started, migration.rows_per_second))

    # --- catch-up: copy what was written meanwhile until little is left -------------------

    async def _catchup(self, migration: Migration) -> None:
        seq = dict(migration.delta_watermark)
        previous: int | None = None
        stalled = 0
        while True:
            migration = await self._check_abort()
            await self._catch_up_inbox()
            backlog = 0
            for shard_id in self.plan.sources:
                async with self._on(shard_id) as con:
                    backlog += await shard_sql.delta_backlog(con, seq.get(shard_id, START))
            # Under a write rate the copy cannot outrun, the backlog stops shrinking: cut
            # over anyway (the final delta is then larger, the pause longer).
            stalled = stalled + 1 if previous is not None and backlog >= previous else 0
            previous = backlog
            if backlog <= CUTOVER_BACKLOG or stalled >= MAX_STALLED_ROUNDS:
                missing = await self._targets_without_workers()
                if not missing:
                    await self._analyze_targets()
                    await self._preverify(seq)
                    await migrations.set_phase(self.meta, migration.migration_id, Phase.CUTOVER)
                    return
                log.info("waiting for a live worker on %s before the cutover", ", ".join(missing))
                await asyncio.sleep(self.settings.poll_interval)
            copied = await self._copy_delta(seq, DELTA_BATCH)
            await migrations.save_delta(self.meta, migration.migration_id, seq, copied)

    async def _analyze_targets(self) -> None:
        """The targets' tables were filled in bulk, faster than autovacuum follows: without
        fresh statistics the planner scans whole tables for the digests that verify single
        dialogs, and the cutover pause grows with the data copied."""
        for target in self.plan.targets:
            async with self._on(target) as tgt:
                await shard_sql.analyze(tgt)

    async def _preverify(self, seq: dict[str, Watermark]) -> None:
        """Verify every moving range while writes still flow, so that the cutover re-checks few.

        Messages are never updated or deleted, and every write to a migrating range (a
        message, or a change of a dialog's state: a send or a read mark) is logged in its
        source's delta in the same transaction. So a range whose digests matched, with the delta head
        taken before the digests, still matches as long as no delta entry past that head
        falls in it. Rounds repeat (copying what is pending, re-digesting only ranges that
        differed or were written to between the previous head and the new one) until few
        ranges remain unverified; the cutover re-checks those and whatever is written after
        the last head. By induction every other range matched as of the last head.
        """
        self.verified = Verified()
        heads = await self._delta_heads()
        check: set[int] | None = None  # None: every range
        for round_index in range(MAX_VERIFY_ROUNDS):
            # Everything logged up to the head is on the target before the digests: what
            # differs then was written past the head (see _beyond_writes) or is wrong.
            await self._copy_pending(seq)
            suspects = await self._beyond_writes(await self._mismatched(check), heads)
            self.verified = self.verified.after_round(heads, suspects)
            newer = await self._delta_heads()
            check = suspects | await self._touched(heads, newer)
            if rounds_done(round_index, check):
                break
            heads = newer
        await self._settle_dialogs(seq)

    async def _settle_dialogs(self, seq: dict[str, Watermark]) -> None:
        """Bring the verified head close to the cutover at a cost that follows the writes.

        The rounds above end with a head taken before their digests, which take longer the
        more rows a range holds; every dialog written since would be re-checked during the
        pause. Each round here copies what is pending, takes a new head, and checks one by
        one the dialogs written between the verified head and the new one (outside the
        suspect ranges): those that match are verified as of the new head (messages are
        append-only), those that differ are re-checked at the cutover. A round costs what
        the writes it covers cost, so a few of them leave the cutover a few dialogs,
        however much data the ranges hold.
        """
        for _ in range(DIALOG_ROUNDS):
            assert self.verified.head is not None
            newer = await self._delta_heads()
            await self._copy_pending(seq)
            differing: dict[str, set[int]] = {}
            for (source, target), keys in (await self._written(self.verified.head, newer)).items():
                async with self._on(source) as src, self._on(target) as tgt:
                    theirs, ours = await asyncio.gather(
                        shard_sql.mixed_digests(src, [], keys), shard_sql.mixed_digests(tgt, [], keys)
                    )
                differing.setdefault(source, set()).update(
                    key for key in keys if theirs.get(("dialog", key)) != ours.get(("dialog", key))
                )
            self.verified = self.verified.settled(newer, differing)

    async def _copy_pending(self, seq: dict[str, Watermark]) -> None:
        """Copy every delta row logged so far (advancing ``seq``) and save the watermarks."""
        copied = 0
        while batch := await self._copy_delta(seq, DELTA_BATCH):
            copied += batch
        await migrations.save_delta(self.meta, self.migration.migration_id, seq, copied)

    async def _written(
        self, since: dict[str, Watermark], until: dict[str, Watermark] | None = None
    ) -> dict[tuple[str, str], list[int]]:
        """Dialogs with a delta entry in (since, until] outside the suspect ranges, by (source, target)."""
        return self.plan.by_pair(await self._delta_keys(since, until), self.verified.suspect_ranges)

    async def _delta_heads(self) -> dict[str, Watermark]:
        heads = {}
        for source in self.plan.sources:
            async with self._on(source) as con:
                heads[source] = await shard_sql.delta_head(con)
        return heads

    async def _touched(self, since: dict[str, Watermark], until: dict[str, Watermark] | None = None) -> set[int]:
        """Moves with a delta entry in (since, until] (or past ``since`` when ``until`` is None)."""
        written = await self._delta_keys(since, until)
        return {self.plan.move_of(source, key).lo for source, keys in written.items() for key in keys}

    async def _delta_keys(
        self, since: dict[str, Watermark], until: dict[str, Watermark] | None = None
    ) -> dict[str, list[int]]:
        """Per source, the dialogs with a delta entry in (since, until] (or past ``since``)."""
        written = {}
        for source, head in since.items():
            async with self._on(source) as con:
                written[source] = await shard_sql.delta_keys(con, head, None if until is None else until[source])
        return written

    async def _mismatched(self, check: set[int] | None) -> set[int]:
        """Digest the moves whose ``lo`` is in ``check`` (all when None) on both sides; return those that differ."""
        bad: set[int] = set()
        for (source, target), spans in self.plan.pairs().items():
            spans = spans if check is None else [s for s in spans if s.lo in check]
            if not spans:
                continue
            async with self._on(source) as src, self._on(target) as tgt:
                theirs, ours = await asyncio.gather(shard_sql.digests(src, spans), shard_sql.digests(tgt, spans))
            bad |= {lo for lo in theirs if theirs[lo] != ours.get(lo)}
        return bad

    async def _beyond_writes(self, bad: set[int], heads: dict[str, Watermark]) -> set[int]:
        """Of the moves in ``bad``, those that still differ once the dialogs written past
        ``heads`` are left out of the comparison.

        Digested while writes flow, a range differs whenever a row has reached its source
        and not yet its target: under steady writes, most ranges written during a round.
        Those dialogs are in the delta log past ``heads``, and the cutover checks each of
        them on its own, so the rest of such a range need not be digested again during the
        pause (where a whole range costs time proportional to the rows it holds). Here each
        is digested once more with those dialogs subtracted: range and dialog digests come
        from one statement on each side (one snapshot), and digests add up. A range that
        then matches is no longer a suspect; one written meanwhile in another dialog stays
        one (safe: it is re-checked whole).
        """
        if not bad:
            return bad
        inside: dict[int, list[int]] = {}  # move lo -> its dialogs written past the heads
        for source, keys in (await self._delta_keys(heads)).items():
            for key in keys:
                lo = self.plan.move_of(source, key).lo
                if lo in bad:
                    inside.setdefault(lo, []).append(key)
        still: set[int] = set()
        for (source, target), spans in self.plan.pairs().items():
            spans = [s for s in spans if s.lo in bad]
            if not spans:
                continue
            keys = [key for span in spans for key in inside.get(span.lo, [])]
            async with self._on(source) as src, self._on(target) as tgt:
                theirs, ours = await asyncio.gather(
                    shard_sql.mixed_digests(src, spans, keys), shard_sql.mixed_digests(tgt, spans, keys)
                )
            for span in spans:
                excluded = inside.get(span.lo, [])
                if without(theirs, span, excluded) != without(ours, span, excluded):
                    still.add(span.lo)
        return still

    async def _targets_without_workers(self) -> list[str]:
        live = {w.shard_id for w in await members.workers(self.meta) if w.age_seconds <= self.settings.liveness_ttl}
        return [t for t in self.plan.targets if t not in live]

    async def _copy_delta(
        self, seq: dict[str, Watermark], limit: int, finished_only: bool = True, merge: bool = False
    ) -> int:
        """One round of delta copying from every source; advances the watermarks. Returns rows copied."""
        copied = 0
        for source in self.plan.sources:
            async with self._on(source) as src:
                rows = await shard_sql.read_delta(src, seq.get(source, START), limit, finished_only)
                # Read after the rows: a state newer than them is fine (what changed it is
                # logged past them, and a copied state never replaces a newer one).
                states = await shard_sql.states_of(src, rows)
            if not rows:
                continue
            by_target = self._by_target(source, rows)
            states_by_target = self._by_target(source, states)
            for target, target_rows in by_target.items():
                async with self._on(target) as tgt:
                    await shard_sql.insert_rows(tgt, target_rows, states_by_target.get(target, []), merge)
            seq[source] = shard_sql.watermark_of(rows[-1])
            copied += len(rows)
        return copied

    def _by_target(self, source: str, rows: Sequence[asyncpg.Record]) -> dict[str, list[asyncpg.Record]]:
        """Rows of ``source`` (messages or dialog states) by the target their dialog moves to."""
        by_target: dict[str, list[asyncpg.Record]] = {}
        for row in rows:
            by_target.setdefault(self.plan.move_of(source, row["dialog_key"]).target, []).append(row)
        return by_target

    # --- the inbox rows of moving user keys (docs/inbox.md, "Resharding") ----------------

    async def _catch_up_inbox(self) -> None:
        """Copy the moving inbox rows whole once per run, then what their log holds since.

        The log's head is taken before the whole copy: a row changed after it is logged past
        it, and one changed before is in the copy. Rows are values kept only when newer, so
        copying one twice, or one the target already has, changes nothing. The log is copied
        while rounds come back full (appliers may keep adding to it; the cutover copies the
        rest with the sources frozen).
        """
        if self._inbox_seq is None:
            seq: dict[str, Watermark] = {}
            for source in self.plan.sources:
                async with self._on(source) as src:
                    seq[source] = await shard_sql.delta_head(src)
            for (source, target), spans in self.plan.pairs().items():
                for span in spans:
                    await self._copy_inbox(source, target, span)
            self._inbox_seq = seq
        while await self._copy_inbox_delta(finished_only=True) >= DELTA_BATCH:
            await self._check_abort()

    async def _copy_inbox(self, source: str, target: str, span: Span) -> int:
        """Every inbox row of ``span`` from ``source`` to ``target`` (which keeps newer ones)."""
        copied, after = 0, None
        while True:
            migration = await self._check_abort()
            async with self._on(source) as src:
                rows = await shard_sql.inbox_batch(src, span, after, migration.batch_size)
            if not rows:
                return copied
            async with self._on(target) as tgt:
                await self._apply_copies(tgt, target, rows)
            copied += len(rows)
            after = (rows[-1].user_key, rows[-1].owner, rows[-1].peer)

    async def _copy_inbox_delta(self, finished_only: bool) -> int:
        """One round of the inbox log from every source; advances the watermarks."""
        assert self._inbox_seq is not None
        copied = 0
        for source in self.plan.sources:
            async with self._on(source) as src:
                rows, last = await shard_sql.read_inbox_delta(
                    src, self._inbox_seq.get(source, START), DELTA_BATCH, finished_only
                )
            by_target: dict[str, list[inbox.InboxRow]] = {}
            for row in rows:
                by_target.setdefault(self.plan.move_of(source, row.user_key).target, []).append(row)
            for target, target_rows in by_target.items():
                async with self._on(target) as tgt:
                    await self._apply_copies(tgt, target, target_rows)
            if last is not None:
                self._inbox_seq[source] = last
                copied += len(rows)
        return copied

    async def _hand_on_announcements(self) -> None:
        """A source's outbox rows for dialogs that left it (its applier leaves those) go to the
        dialogs' new shards, whose appliers project them from the state there."""
        for source in self.plan.sources:
            async with self._on(source) as src:
                pending = await shard_sql.pending_announcements(src, self.plan.leaving(source))
            for target, dialogs in self._by_target(source, pending).items():
                async with self._on(target) as tgt:
                    await shard_sql.announce(tgt, dialogs)
            if pending:
                async with self._on(source) as src:
                    await shard_sql.forget_announcements(src, [row["seq"] for row in pending])

    async def _apply_copies(self, tgt: asyncpg.Connection, target: str, rows: list[inbox.InboxRow]) -> None:
        statuses = await inbox.apply(tgt, rows, copy=True)
        refused = [key for key, status in statuses.items() if status != "applied"]
        if refused:  # the target does not hold the range it is receiving: a bug, never skipped
            raise RuntimeError(f"{target} refused {len(refused)} inbox row(s) of its moving ranges, first {refused[0]}")

    async def _preverify_inbox(self) -> None:
        """Compare the moving inbox rows range by range while the appliers still write, so
        that the cutover's pause compares few.

        Every change of an inbox row in a migrating range logs its key in the source's
        ``inbox_delta`` in the same transaction. So once a range matched on both sides with
        everything logged up to a head copied, the rows in it not logged past that head
        still match at the cutover: the cutover compares the rows logged past the first
        head (and their owners' totals) and, whole, the ranges that never matched. Rounds
        re-check only the ranges that differed (a change between the copy and the digest).
        """
        heads = await self._delta_heads()
        suspects = {pair: list(spans) for pair, spans in self.plan.pairs().items()}
        for _ in range(MAX_VERIFY_ROUNDS):
            await self._catch_up_inbox()
            for (source, target), spans in suspects.items():
                if not spans:
                    continue
                async with self._on(source) as src, self._on(target) as tgt:
                    theirs, ours = await asyncio.gather(
                        shard_sql.inbox_range_digests(src, spans), shard_sql.inbox_range_digests(tgt, spans)
                    )
                suspects[(source, target)] = [s for s in spans if theirs.get(s.lo) != ours.get(s.lo)]
            if not any(suspects.values()):
                break
        self._inbox_checked = (heads, suspects)

    async def _verify_inbox(self) -> None:
        """In the cutover, sources frozen: copy the inbox log's rest, then compare what the
        pre-verification left: the rows logged since its head with their owners' totals,
        and the ranges that still differed (every range, without one: a resumed run).
        A difference fails the cutover as a message's does."""
        while await self._copy_inbox_delta(finished_only=False):
            pass
        pairs = self.plan.pairs()
        keys: dict[tuple[str, str], list[inbox.RowKey]] = {pair: [] for pair in pairs}
        if self._inbox_checked is None:
            ranges = pairs
        else:
            heads, ranges = self._inbox_checked
            for source in self.plan.sources:
                async with self._on(source) as src:
                    logged = await shard_sql.inbox_delta_keys(src, heads.get(source, START))
                for key in logged:
                    keys[(source, self.plan.move_of(source, key[0]).target)].append(key)

        async def compare(source: str, target: str) -> None:
            spans, rows = ranges.get((source, target), []), keys[(source, target)]
            if not spans and not rows:
                return
            async with self._on(source) as src, self._on(target) as tgt:
                theirs, ours = await asyncio.gather(_inbox_digests(src, spans, rows), _inbox_digests(tgt, spans, rows))
            if theirs != ours:
                raise _VerificationFailed(
                    f"the inbox rows moving from {source} to {target} differ: source {theirs}, target {ours}"
                )

        await asyncio.gather(*(compare(source, target) for source, target in pairs))

    # --- cutover: freeze, final delta, verify, flip; bounded by the deadline --------------

    async def _cutover(self, migration: Migration) -> None:
        """Freeze, copy the rest, verify, hand over, flip: all on the sources' lease.

        The sources freeze on a lease of ``cutover_deadline`` that their own clocks enforce:
        past it, the ranges serve again whatever this runner or the metadata database do.
        So the flip must commit before the earliest lease ends, less a margin for clock
        difference and the commit itself: the metadata server checks that with its clock,
        this runner with its own. The pause recorded is the one clients saw: from before
        the freeze until the flip committed.
        """
        await self._preverify_inbox()  # outside the pause: the freeze leaves only the last changes
        lease = self.settings.cutover_deadline
        budget = CutoverBudget(lease)
        started = time.monotonic()
        steps = [started]
        try:
            async with asyncio.timeout(budget.until_flip):
                frozen = await self._freeze(migration.delta_watermark, lease)
                steps.append(time.monotonic())
                await self._apply_and_verify(frozen.rows, frozen.states)
                await self._verify_inbox()
                steps.append(time.monotonic())
                if not await self._hand_over():
                    raise _LeaseLost("a source's lease ran out before the hand-over")
                steps.append(time.monotonic())
        except _CUTOVER_FAILED as exc:
            reason = "cutover deadline passed" if isinstance(exc, TimeoutError) else f"cutover failed: {exc}"
            await self._cutover_failed(migration, reason, fatal=isinstance(exc, _VerificationFailed))
            self.observer.cutover(time.monotonic() - started, False)
            return
        by = budget.flip_by(frozen.lease_ends)
        within = budget.left(time.monotonic() - started)
        try:
            # The server bounds its own wait (statement and lock timeouts); this bounds ours
            # when the server does not answer at all.
            async with asyncio.timeout(within + budget.margin):
                await migrations.flip(self.meta, migration, by, within, frozen.watermarks)
        except (errors.Conflict, asyncpg.PostgresError) as exc:
            # The server answered. Almost always: nothing was written. But an error can come
            # after a durable commit (the server shut down right after it): the phase says.
            current = await self._reload()
            if current.phase == Phase.CLEANUP:
                log.warning("migration %s: the flip committed, then: %s", migration.migration_id, exc)
                return  # cleanup releases the sources
            active = await maps.active_map(self.meta)
            map_changed = active is not None and active.map_version != migration.from_version
            if current.abort_requested:
                reason = "aborted by the operator"
            elif map_changed:
                reason = "the shard map changed under the migration"
            else:  # the leases ran out first, or the row could not be had in time: try again
                reason = f"could not activate the new map: {exc}"
            await self._cutover_failed(migration, reason, fatal=current.abort_requested or map_changed)
            self.observer.cutover(time.monotonic() - started, False)
            return
        except pg.UNAVAILABLE:  # TimeoutError included
            # No answer: the flip may or may not have committed, and only the metadata
            # database can tell. The sources' leases end on their own; give up the run
            # (and with it the lease on the migration, whose connection goes) so that the
            # next runner reads the outcome from the phase.
            log.warning(
                "migration %s: no answer from the metadata database to the flip; the sources' leases end by themselves",
                migration.migration_id,
            )
            self.meta.terminate()
            self.observer.cutover(time.monotonic() - started, False)
            raise
        pause = time.monotonic() - started
        steps.append(time.monotonic())
        await self._flip_durable(migration)
        await self._best_effort(
            "release the moved ranges on the sources (cleanup does it again)", self._release_sources()
        )
        self.observer.cutover(pause, True)
        await migrations.record_pause(self.meta, migration.migration_id, pause * 1000)
        took = [
            f"{name} {(b - a) * 1000:.1f}"
            for name, a, b in zip(("freeze", "verify", "hand-over", "flip"), steps, steps[1:], strict=False)
        ]
        ranges, dialogs = self._checked_at_cutover
        log.info(
            "migration %s cut over in %.1f ms (%s ms; verified %d ranges whole and %d dialogs)",
            migration.migration_id,
            pause * 1000,
            ", ".join(took),
            ranges,
            dialogs,
        )

    async def _freeze(self, watermarks: dict[str, Watermark], lease: float) -> _Frozen:
        """Sources stop taking writes in moving ranges for ``lease`` seconds (in-flight ones
        commit first: the fence) and hand back the rest of their delta log, in one call each."""
        if not self._targets_incoming:
            await self._set(Ownership.INCOMING, self.plan.targets, self.plan.arriving)
            self._targets_incoming = True

        async def one(source: str) -> tuple[str, list[asyncpg.Record], list[asyncpg.Record], datetime.datetime]:
            async with self._on(source) as con:
                rows, ends = await shard_sql.freeze(
                    con, self.plan.leaving(source), watermarks.get(source, START), lease
                )
                # Frozen: the states of the rows' dialogs can no longer change.
                return source, rows, await shard_sql.states_of(con, rows), ends

        frozen = _Frozen()
        for source, rows, states, ends in await asyncio.gather(*(one(source) for source in self.plan.sources)):
            frozen.rows[source] = rows
            frozen.states[source] = states
            frozen.lease_ends[source] = ends
            frozen.watermarks[source] = shard_sql.watermark_of(rows[-1]) if rows else watermarks.get(source, START)
        return frozen

    async def _apply_and_verify(
        self, left: dict[str, list[asyncpg.Record]], states: dict[str, list[asyncpg.Record]]
    ) -> None:
        """Copy the last rows and compare counts and checksums, source against target.

        Without pre-verification (a resumed run): every range, whole. After it: whole
        ranges only for those that differed at the last round; for ranges that matched
        then, only the dialogs written to since its head. Messages are append-only, every
        change of a dialog's state logs a delta entry in its transaction, and every row
        logged before the head was on both sides when they matched (a copy of it arriving
        later changes nothing), so such a range can differ only in dialogs logged after
        the head.
        """
        rows_by_pair: dict[tuple[str, str], list[asyncpg.Record]] = {pair: [] for pair in self.plan.pairs()}
        states_by_pair: dict[tuple[str, str], list[asyncpg.Record]] = {pair: [] for pair in self.plan.pairs()}
        for by_pair, of_source in ((rows_by_pair, left), (states_by_pair, states)):
            for source, rows in of_source.items():
                for target, target_rows in self._by_target(source, rows).items():
                    by_pair[(source, target)].extend(target_rows)
        head = self.verified.head
        written = await self._delta_keys(head) if head is not None else {}
        checks = self.verified.cutover_checks(self.plan, written)
        pairs, keys_by_pair = checks.spans, checks.keys

        async def compare(source: str, target: str) -> None:
            spans, rows, keys = pairs[(source, target)], rows_by_pair[(source, target)], keys_by_pair[(source, target)]
            if not spans and not rows and not keys:
                return
            async with self._on(source) as src, self._on(target) as tgt:
                theirs, ours = await asyncio.gather(
                    shard_sql.mixed_digests(src, spans, keys),
                    shard_sql.apply_and_digest(tgt, rows, states_by_pair[(source, target)], spans, keys),
                )
            bad = [key for key in theirs if theirs[key] != ours.get(key)]
            if bad:
                raise _VerificationFailed(
                    f"{len(bad)} range(s) or dialog(s) from {source} to {target} differ, first {bad[0]}:"
                    f" source {theirs[bad[0]]}, target {ours.get(bad[0])}"
                )

        self._checked_at_cutover = checks.counts
        await asyncio.gather(*(compare(source, target) for source, target in pairs))

    async def _hand_over(self) -> bool:
        """Sources stop serving reads too (on the freeze's lease) and targets start. No proxy
        routes to a target before the map flips, so the two can happen together. False if a
        source's lease ran out first."""

        async def source(shard_id: str) -> bool:
            async with self._on(shard_id) as con:
                return await shard_sql.hand_over(con, self.plan.leaving(shard_id))

        handed, _ = await asyncio.gather(
            asyncio.gather(*(source(shard_id) for shard_id in self.plan.sources)),
            self._set(Ownership.OWNED, self.plan.targets, self.plan.arriving),
        )
        self._targets_incoming = False
        return all(handed)

    async def _release_sources(self) -> None:
        """After the flip: sources drop the moved ranges for good (no lease to run out)."""
        await self._set(ABSENT, self.plan.sources, self.plan.leaving)

    async def _cutover_failed(self, migration: Migration, reason: str, fatal: bool) -> None:
        """Give the ranges back to their sources (writable again) and go back to catch-up, or abort.

        Only called when the flip certainly did not happen. The sources come first and need
        nothing of the targets: a stalled or lost target must not keep them frozen (their
        leases would end it anyway, this just does not wait for that). The targets are reset
        on a best-effort basis; the next freeze resets them again before anything else.
        """
        log.warning("migration %s: %s", migration.migration_id, reason)
        await self._best_effort(
            "give the moving ranges back to the sources (their leases will)",
            self._set(Ownership.MIGRATING, self.plan.sources, self.plan.leaving),
        )
        attempts = await migrations.cutover_failed(self.meta, migration.migration_id, reason)
        self._targets_incoming = await self._best_effort(
            "reset the targets (the next freeze does it first)",
            self._set(Ownership.INCOMING, self.plan.targets, self.plan.arriving),
        )
        if fatal or attempts >= MAX_CUTOVER_ATTEMPTS:
            await migrations.set_phase(self.meta, migration.migration_id, Phase.ABORTING, reason)

    # --- cleanup: after every live process knows the new map, drop moved rows -------------

    async def _flip_durable(self, migration: Migration) -> None:
        """Wait until the flip is on the metadata database's synchronous standby: nothing
        acts on a flip that a metadata failover could still forget (see ``confirm_flip``).

        The sources' leases run out meanwhile and they serve again; what they take then is
        logged and copied as late writes by cleanup.
        """
        while True:
            try:
                async with asyncio.timeout(FLIP_CONFIRM_SLICE):
                    await migrations.confirm_flip(self.meta, migration.migration_id)
                return
            except TimeoutError:
                log.warning(
                    "migration %s: waiting for the metadata database's synchronous standby to have the flip;"
                    " nothing moves on before it does",
                    migration.migration_id,
                )

    async def _cleanup(self, migration: Migration) -> None:
        # Idempotent: makes sure the flip's states hold after any crash.
        await self._flip_durable(migration)
        await asyncio.gather(self._release_sources(), self._set(Ownership.OWNED, self.plan.targets, self.plan.arriving))
        await self._copy_late_writes(migration)
        # Inbox rows a source changed after the final copy (a lease that ran out, as for
        # messages): the whole log again, from its start; the targets keep what is newer.
        self._inbox_seq = {}
        while await self._copy_inbox_delta(finished_only=False):
            pass
        await self._hand_on_announcements()
        version = migration.target_map.map_version
        while laggards := await members.laggards(self.meta, version, self.settings.liveness_ttl):
            log.info("waiting for %s to acknowledge map version %s", ", ".join(laggards), version)
            await asyncio.sleep(self.settings.poll_interval)
        for shard_id in self.plan.sources:
            async with self._on(shard_id) as con:
                for span in self.plan.leaving(shard_id):
                    while await shard_sql.delete_span_batch(con, span, migration.batch_size):
                        pass
                await shard_sql.clear_delta(con)
        if migration.kind == "remove":
            await maps.retire_shard(self.meta, migration.shard_id)
        await migrations.set_phase(self.meta, migration.migration_id, Phase.DONE)

    async def _copy_late_writes(self, migration: Migration) -> None:
        """Copy what a source took after the final copy, which only a lease that ran out
        between the flip and the release can let through (a runner and the metadata server
        both stopped right after the flip committed): logged in its delta, so nothing is lost.
        """
        seq = dict(migration.delta_watermark)
        late = 0
        # The sources were just released behind the fence: every write to the moved ranges
        # has finished, so every delta row is final (finished_only=False: see read_delta).
        while copied := await self._copy_delta(seq, DELTA_BATCH, finished_only=False, merge=True):
            late += copied
        for source in self.plan.sources:
            async with self._on(source) as con:
                left = await shard_sql.delta_backlog(con, seq.get(source, START))
            if left:  # a row logged without its message: never delete what was not copied
                raise RuntimeError(f"{left} delta rows of {source} past the copied watermark; cleanup stops here")
        if late:
            log.error(
                "migration %s: %d message(s) reached a source after the flip (its lease ran out before it"
                " was released); copied to their new shard",
                migration.migration_id,
                late,
            )

    # --- abort: before the flip, the old owners keep everything ---------------------------

    async def _abort(self, migration: Migration) -> None:
        """Sources own their old ranges again, then targets drop what they received.

        The sources come first and need nothing of the targets: a target that is gone, or
        stalled, must not keep the sources migrating (their delta log growing). A target
        that cannot be reached keeps its copies ('incoming' ranges and rows, served by
        nobody); adding that database again is refused until it is emptied. A target that
        turns out to be a source's own database is never touched: its "copies" are the
        source's rows.
        """
        old = await maps.shard_map_version(self.meta, migration.from_version)
        assert old is not None, "a migration's first map is never deleted"
        for shard_id in self.plan.sources:
            async with self._on(shard_id) as con:
                # Its ranges in the old map, whole, replacing whatever covers them now (split
                # pieces, or nothing yet if prepare never came this far).
                await shard_sql.fenced(con, owned_after_split(old.ring, shard_id, []), {})
                await shard_sql.clear_delta(con)
        sources = await self._identities(self.plan.sources)
        for shard_id in self.plan.targets:
            await self._best_effort(
                f"remove the copies on {shard_id} (they are served by no one)", self._drop_copies(shard_id, sources)
            )
        await migrations.set_phase(self.meta, migration.migration_id, Phase.ABORTED)

    async def _drop_copies(self, target: str, sources: dict[str, str]) -> None:
        async with self._on(target) as con:
            holdings = await shard_sql.holdings(con)
            problem = same_database(holdings.identity, sources)
            if (
                problem is None
                and self.migration.kind == "add"
                and await shard_sql.ranges_besides(con, self.plan.arriving(target))
            ):
                problem = "it serves ranges of its own (it was refused as a new shard)"
            if problem is not None:
                log.error("migration %s: not touching %s: %s", self.migration.migration_id, target, problem)
                return
            await _upgrade(con)  # an abort may come before prepare reached it
            await shard_sql.set_state(con, self.plan.arriving(target), ABSENT)
            await shard_sql.delete_spans(con, self.plan.arriving(target))

    async def _identities(self, shard_ids: list[str]) -> dict[str, str]:
        """Where each shard's tables live (``shard_sql.identity``)."""

        async def one(shard_id: str) -> tuple[str, str]:
            async with self._on(shard_id) as con:
                return shard_id, await shard_sql.identity(con)

        return dict(await asyncio.gather(*(one(shard_id) for shard_id in shard_ids)))

    async def _new_shard_problem(self, migration: Migration) -> str | None:
        """Why the shard an add brings must not receive ranges (``migration_plan.target_problem``).

        Checked again here, not only by the admin API: a DSN can be changed under a
        registered shard, and a copy must never start on a database that serves ranges.
        """
        if migration.kind != "add":
            return None  # the targets of a remove or weight change are shards of the map
        async with self._on(migration.shard_id) as con:
            holdings = await shard_sql.holdings(con)
        problem = target_problem(holdings, await self._identities(self.plan.sources), resuming=True)
        return None if problem is None else f"{migration.shard_id} cannot be a new shard: {problem}"
