-- A shard that was removed from the map by a finished migration.
ALTER TABLE shards ADD COLUMN retired_at timestamptz;

-- One row per resharding. phase moves: prepare -> copy -> catchup -> cutover -> cleanup
-- -> done, or (before the flip) -> aborting -> aborted. A failed cutover returns to
-- catchup. docs/resharding.md says what each phase does and how a crash in it resumes.
CREATE TABLE migrations (
    migration_id     bigserial PRIMARY KEY,
    kind             text NOT NULL CHECK (kind IN ('add', 'remove', 'weight')),
    shard_id         text NOT NULL,
    from_version     bigint NOT NULL,
    target_map       jsonb NOT NULL,
    phase            text NOT NULL DEFAULT 'prepare' CHECK (phase IN
                         ('prepare', 'copy', 'catchup', 'cutover', 'cleanup', 'done', 'aborting', 'aborted')),
    abort_requested  boolean NOT NULL DEFAULT false,
    rows_per_second  integer NOT NULL DEFAULT 0 CHECK (rows_per_second >= 0),
    batch_size       integer NOT NULL DEFAULT 5000 CHECK (batch_size BETWEEN 100 AND 100000),
    rows_total       bigint NOT NULL DEFAULT 0,
    rows_copied      bigint NOT NULL DEFAULT 0,
    delta_copied     bigint NOT NULL DEFAULT 0,
    delta_watermark  jsonb NOT NULL DEFAULT '{}',  -- per source: [xid, seq] copied up to
    cutover_attempts integer NOT NULL DEFAULT 0,
    last_pause_ms    double precision,
    error            text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz
);
-- One migration at a time: at most one row that has not finished.
CREATE UNIQUE INDEX migrations_one_active ON migrations ((true)) WHERE phase NOT IN ('done', 'aborted');

-- The ranges a migration moves, with the copy checkpoint of each.
CREATE TABLE migration_ranges (
    migration_id  bigint NOT NULL REFERENCES migrations ON DELETE CASCADE,
    lo            bigint NOT NULL,
    hi            bigint NOT NULL,
    source        text NOT NULL,
    target        text NOT NULL,
    rows_estimate bigint NOT NULL DEFAULT 0,
    cursor_key    bigint,
    cursor_lo     uuid,
    cursor_hi     uuid,
    cursor_id     bigint,
    copied        boolean NOT NULL DEFAULT false,
    PRIMARY KEY (migration_id, lo)
);

CREATE FUNCTION notify_migration() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('dialogs_migration', NEW.migration_id::text);
    RETURN NULL;
END $$;
CREATE TRIGGER migrations_notify AFTER INSERT OR UPDATE OF phase, abort_requested ON migrations
    FOR EACH ROW EXECUTE FUNCTION notify_migration();

-- Proxies register like workers, so that cleanup can wait until every live process has
-- acknowledged the new map version.
CREATE TABLE proxies (
    proxy_id     text PRIMARY KEY,
    url          text NOT NULL DEFAULT '',
    map_version  bigint NOT NULL DEFAULT 0,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now()
);
