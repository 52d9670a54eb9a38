-- Which ranges of the ring this shard serves, and how (docs/resharding.md):
--   owned      reads and writes
--   migrating  reads and writes; each write also logs its key in migration_delta
--   frozen     reads only; writes are refused until the cutover ends
--   incoming   nothing: a copy target, served only after the flip
-- A key in no row is not served here at all (it moved away, or never was here).
CREATE TABLE shard_ranges (
    lo    bigint PRIMARY KEY,
    hi    bigint NOT NULL,
    state text NOT NULL CHECK (state IN ('owned', 'migrating', 'frozen', 'incoming')),
    CHECK (lo <= hi)
);

-- Keys of rows written to migrating ranges, for the catch-up copy. Readers take rows in
-- (xid, seq) order and only from transactions older than their snapshot's xmin: those
-- have all finished, so no row can later appear behind a reader's watermark (a plain
-- sequence would let a transaction that logged first but committed last be skipped).
CREATE TABLE migration_delta (
    seq        bigserial PRIMARY KEY,
    xid        bigint NOT NULL DEFAULT (pg_current_xact_id()::text::bigint),
    dialog_key bigint NOT NULL,
    user_lo    uuid NOT NULL,
    user_hi    uuid NOT NULL,
    id         bigint NOT NULL
);
CREATE INDEX migration_delta_order ON migration_delta (xid, seq);

-- The state of the range holding p_key here, or NULL when this shard does not serve it.
CREATE FUNCTION range_state(p_key bigint) RETURNS text LANGUAGE sql STABLE AS $$
    SELECT r.state
    FROM (SELECT hi, state FROM shard_ranges WHERE lo <= p_key ORDER BY lo DESC LIMIT 1) AS r
    WHERE r.hi >= p_key
$$;

-- Store one group commit's sends. Status per input row:
--   inserted | duplicate (its Idempotency-Key exists; the caller looks the row up)
--   frozen (the range is in cutover) | not_served (the range is not this shard's)
CREATE FUNCTION store_messages(
    p_dialog_key bigint[], p_lo uuid[], p_hi uuid[], p_from_lo boolean[], p_text text[], p_key text[]
) RETURNS TABLE (ord bigint, id bigint, created_at timestamptz, status text)
LANGUAGE plpgsql VOLATILE AS $$
#variable_conflict use_column
BEGIN
    -- The shared side of the fence (the freeze takes it exclusively and so waits for this
    -- transaction). It is its own statement so that the ownership check below reads a
    -- snapshot taken after the lock: a freeze that committed first is always seen.
    PERFORM pg_advisory_xact_lock_shared(7236281096744167283);
    RETURN QUERY
    WITH input AS MATERIALIZED (
        SELECT t.*, range_state(t.dialog_key) AS state
        FROM unnest(p_dialog_key, p_lo, p_hi, p_from_lo, p_text, p_key)
            WITH ORDINALITY AS t(dialog_key, user_lo, user_hi, from_lo, text, idempotency_key, ord)
    ), numbered AS MATERIALIZED (
        SELECT i.*, next_message_id(i.dialog_key, i.user_lo, i.user_hi) AS id, clock_timestamp() AS created_at
        FROM input i
        WHERE i.state IN ('owned', 'migrating')
        ORDER BY i.ord
    ), inserted AS (
        INSERT INTO messages AS m (dialog_key, user_lo, user_hi, id, from_lo, text, created_at, idempotency_key)
        SELECT n.dialog_key, n.user_lo, n.user_hi, n.id, n.from_lo, n.text, n.created_at, n.idempotency_key
        FROM numbered n
        ON CONFLICT (dialog_key, user_lo, user_hi, from_lo, idempotency_key) WHERE idempotency_key IS NOT NULL
        DO NOTHING
        RETURNING m.dialog_key, m.user_lo, m.user_hi, m.id
    ), logged AS (
        INSERT INTO migration_delta (dialog_key, user_lo, user_hi, id)
        SELECT ins.dialog_key, ins.user_lo, ins.user_hi, ins.id
        FROM inserted ins JOIN numbered n USING (dialog_key, user_lo, user_hi, id)
        WHERE n.state = 'migrating'
    )
    SELECT i.ord, n.id, n.created_at,
           CASE WHEN i.state IS NULL OR i.state = 'incoming' THEN 'not_served'
                WHEN i.state = 'frozen' THEN 'frozen'
                WHEN ins.id IS NULL THEN 'duplicate'
                ELSE 'inserted' END
    FROM input i
    LEFT JOIN numbered n ON n.ord = i.ord
    LEFT JOIN inserted ins
        ON ins.dialog_key = n.dialog_key AND ins.user_lo = n.user_lo AND ins.user_hi = n.user_hi AND ins.id = n.id
    ORDER BY i.ord;
END $$;
