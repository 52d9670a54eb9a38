-- The cutover holds moving ranges on a lease (docs/resharding.md, "The lease on a cutover").
--
-- A source's ranges stop taking writes ('frozen') and then reads too ('leaving') only
-- until lease_until, a time this server's clock fixed when the freeze committed. Past it,
-- the range serves reads and writes again as 'migrating' (writes logged for the next
-- attempt) without anyone acting: a runner that died, hangs, or cannot reach a target or
-- the metadata database cannot leave a range unserved for longer than the lease.
-- The flip to the new map is only made while every source's lease has time left (the
-- runner checks in the metadata database, with a margin for clock difference), and a
-- source is told to stop serving for good ('absent') right after it.
-- A range frozen by a cutover of the previous version has no lease, and its runner (old
-- code) would flip without one: let that migration end first (it finishes, or the operator
-- aborts it) rather than invent a lease for it.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM shard_ranges WHERE state = 'frozen') THEN
        RAISE EXCEPTION 'a migration of the previous version is in its cutover on this shard (frozen ranges):'
            ' let it finish, or abort it, before upgrading';
    END IF;
END $$;
ALTER TABLE shard_ranges DROP CONSTRAINT shard_ranges_state_check;
ALTER TABLE shard_ranges ADD CONSTRAINT shard_ranges_state_check
    CHECK (state IN ('owned', 'migrating', 'frozen', 'leaving', 'incoming'));
ALTER TABLE shard_ranges ADD COLUMN lease_until timestamptz;
ALTER TABLE shard_ranges ADD CONSTRAINT shard_ranges_lease_check
    CHECK ((state IN ('frozen', 'leaving')) = (lease_until IS NOT NULL));

-- A state as it is now: a lease that ran out reads as 'migrating'. statement_timestamp()
-- is never later than the true time, so a lease is never seen expired too early.
CREATE FUNCTION effective_state(p_state text, p_lease_until timestamptz) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN p_state IN ('frozen', 'leaving') AND p_lease_until <= statement_timestamp()
                THEN 'migrating' ELSE p_state END
$$;

CREATE OR REPLACE FUNCTION range_state(p_key bigint) RETURNS text LANGUAGE sql STABLE AS $$
    SELECT effective_state(r.state, r.lease_until)
    FROM (SELECT hi, state, lease_until FROM shard_ranges WHERE lo <= p_key ORDER BY lo DESC LIMIT 1) AS r
    WHERE r.hi >= p_key
$$;

-- 'frozen' and 'leaving' take a lease of p_lease from now; other states drop it.
DROP FUNCTION freeze_ranges(bigint[], bigint[], bigint, bigint);
DROP FUNCTION set_range_states(bigint[], bigint[], text);
CREATE FUNCTION set_range_states(p_lo bigint[], p_hi bigint[], p_state text, p_lease interval DEFAULT NULL)
RETURNS void LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(7236281096744167283);
    IF p_state = 'absent' THEN
        DELETE FROM shard_ranges WHERE lo = ANY(p_lo);
    ELSE
        INSERT INTO shard_ranges (lo, hi, state, lease_until)
        SELECT lo, hi, p_state, CASE WHEN p_state IN ('frozen', 'leaving') THEN clock_timestamp() + p_lease END
        FROM unnest(p_lo, p_hi) AS t(lo, hi)
        ON CONFLICT (lo) DO UPDATE SET hi = EXCLUDED.hi, state = EXCLUDED.state, lease_until = EXCLUDED.lease_until;
    END IF;
END $$;

-- Source: freeze ranges on a lease of p_lease and return what the delta log holds past
-- (p_xid, p_seq), as before.
CREATE FUNCTION freeze_ranges(p_lo bigint[], p_hi bigint[], p_xid bigint, p_seq bigint, p_lease interval)
RETURNS TABLE (xid bigint, seq bigint, dialog_key bigint, user_lo uuid, user_hi uuid, id bigint, from_lo boolean,
               text text, created_at timestamptz, idempotency_key text)
LANGUAGE plpgsql VOLATILE AS $$
#variable_conflict use_column
BEGIN
    PERFORM set_range_states(p_lo, p_hi, 'frozen', p_lease);
    RETURN QUERY
    SELECT d.xid, d.seq, m.dialog_key, m.user_lo, m.user_hi, m.id, m.from_lo, m.text, m.created_at,
           m.idempotency_key
    FROM migration_delta d JOIN messages m USING (dialog_key, user_lo, user_hi, id)
    WHERE (d.xid, d.seq) > (p_xid, p_seq) ORDER BY d.xid, d.seq;
END $$;

-- Source, after the final copy and verification: frozen ranges stop serving reads too
-- ('leaving'), keeping their lease, but only if the lease has not run out (a range whose
-- lease ran out may have taken writes since). Returns how many ranges were handed over:
-- fewer than asked means the cutover is too late and must give the ranges back.
CREATE FUNCTION hand_over_ranges(p_lo bigint[]) RETURNS integer
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    n integer;
BEGIN
    PERFORM pg_advisory_xact_lock(7236281096744167283);
    UPDATE shard_ranges SET state = 'leaving'
    WHERE lo = ANY(p_lo) AND state IN ('frozen', 'leaving') AND lease_until > clock_timestamp();
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END $$;

-- store_messages as in 0002, with 'leaving' refused like 'frozen' (the proxy holds the
-- write and retries). range_state() above already reads an expired lease as 'migrating'.
CREATE OR REPLACE FUNCTION store_messages(
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
                WHEN i.state IN ('frozen', 'leaving') THEN 'frozen'
                WHEN ins.id IS NULL THEN 'duplicate'
                ELSE 'inserted' END
    FROM input i
    LEFT JOIN numbered n ON n.ord = i.ord
    LEFT JOIN inserted ins
        ON ins.dialog_key = n.dialog_key AND ins.user_lo = n.user_lo AND ins.user_hi = n.user_hi AND ins.id = n.id
    ORDER BY i.ord;
END $$;
