-- Set the state of ranges behind the exclusive side of the fence, in one round trip:
-- writes in flight commit first, later ones see the new state. 'absent' removes the
-- ranges (this shard stops serving them). Used by every cutover step, so it is kept to
-- one statement for the caller and one implicit transaction.
CREATE FUNCTION set_range_states(p_lo bigint[], p_hi bigint[], p_state text) RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(7236281096744167283);
    IF p_state = 'absent' THEN
        DELETE FROM shard_ranges WHERE lo = ANY(p_lo);
    ELSE
        INSERT INTO shard_ranges (lo, hi, state)
        SELECT lo, hi, p_state FROM unnest(p_lo, p_hi) AS t(lo, hi)
        ON CONFLICT (lo) DO UPDATE SET hi = EXCLUDED.hi, state = EXCLUDED.state;
    END IF;
END $$;
