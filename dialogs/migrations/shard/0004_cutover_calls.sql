-- Cutover steps as single calls: while ranges are frozen every round trip is client pause.

-- Source: freeze ranges (behind the fence) and return what the delta log holds past the
-- watermark (p_xid, p_seq). That is all that is left to copy: the fence waited for every
-- writer, and frozen ranges take no more writes, so nothing can commit behind it.
CREATE FUNCTION freeze_ranges(p_lo bigint[], p_hi bigint[], p_xid bigint, p_seq bigint)
RETURNS TABLE (xid bigint, seq bigint, dialog_key bigint, user_lo uuid, user_hi uuid, id bigint, from_lo boolean,
               text text, created_at timestamptz, idempotency_key text)
LANGUAGE plpgsql VOLATILE AS $$
#variable_conflict use_column
BEGIN
    PERFORM set_range_states(p_lo, p_hi, 'frozen');
    RETURN QUERY
    SELECT d.xid, d.seq, m.dialog_key, m.user_lo, m.user_hi, m.id, m.from_lo, m.text, m.created_at,
           m.idempotency_key
    FROM migration_delta d JOIN messages m USING (dialog_key, user_lo, user_hi, id)
    WHERE (d.xid, d.seq) > (p_xid, p_seq) ORDER BY d.xid, d.seq;
END $$;

-- Per range: row count and the sum of row hashes. Equal on both sides means equal rows.
CREATE FUNCTION range_digests(p_lo bigint[], p_hi bigint[])
RETURNS TABLE (lo bigint, rows bigint, checksum numeric)
LANGUAGE sql STABLE AS $$
    SELECT r.lo, count(m.id),
           coalesce(sum(hashtextextended(concat_ws('|', m.dialog_key, m.user_lo, m.user_hi, m.id, m.from_lo, m.text,
                    (extract(epoch FROM m.created_at) * 1000000)::bigint, m.idempotency_key), 0)::numeric), 0)
    FROM unnest(p_lo, p_hi) AS r(lo, hi)
    LEFT JOIN messages m ON m.dialog_key BETWEEN r.lo AND r.hi
    GROUP BY r.lo
$$;

-- Target: insert copied rows (skipping ones already here), then digest the given ranges,
-- in one call. The digest is a later statement, so it sees the rows just inserted.
CREATE FUNCTION apply_and_digest(
    p_dialog_key bigint[], p_user_lo uuid[], p_user_hi uuid[], p_id bigint[], p_from_lo boolean[], p_text text[],
    p_created_at timestamptz[], p_key text[], p_lo bigint[], p_hi bigint[]
) RETURNS TABLE (lo bigint, rows bigint, checksum numeric)
LANGUAGE plpgsql VOLATILE AS $$
#variable_conflict use_column
BEGIN
    INSERT INTO messages (dialog_key, user_lo, user_hi, id, from_lo, text, created_at, idempotency_key)
    SELECT * FROM unnest(p_dialog_key, p_user_lo, p_user_hi, p_id, p_from_lo, p_text, p_created_at, p_key)
    ON CONFLICT DO NOTHING;
    RETURN QUERY SELECT * FROM range_digests(p_lo, p_hi);
END $$;
