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

-- Per dialog key: row count and the sum of row hashes (the same hash as range_digests).
CREATE FUNCTION dialog_digests(p_keys bigint[])
RETURNS TABLE (dialog_key bigint, rows bigint, checksum numeric)
LANGUAGE sql STABLE AS $$
    SELECT k.key, count(m.id),
           coalesce(sum(hashtextextended(concat_ws('|', m.dialog_key, m.user_lo, m.user_hi, m.id, m.from_lo, m.text,
                    (extract(epoch FROM m.created_at) * 1000000)::bigint, m.idempotency_key), 0)::numeric), 0)
    FROM unnest(p_keys) AS k(key)
    LEFT JOIN messages m ON m.dialog_key = k.key
    GROUP BY k.key
$$;

-- Digests of whole ranges and of single dialogs, in one call: kind is 'range' (key = lo)
-- or 'dialog' (key = dialog_key).
CREATE FUNCTION digests(p_lo bigint[], p_hi bigint[], p_keys bigint[])
RETURNS TABLE (kind text, key bigint, rows bigint, checksum numeric)
LANGUAGE sql STABLE AS $$
    SELECT 'range', r.lo, r.rows, r.checksum FROM range_digests(p_lo, p_hi) AS r
    UNION ALL
    SELECT 'dialog', d.dialog_key, d.rows, d.checksum FROM dialog_digests(p_keys) AS d
$$;

-- Target: insert copied rows (skipping ones already here), then digest, in one call. The
-- digests are a later statement, so they see the rows just inserted.
CREATE FUNCTION apply_and_digest(
    p_dialog_key bigint[], p_user_lo uuid[], p_user_hi uuid[], p_id bigint[], p_from_lo boolean[], p_text text[],
    p_created_at timestamptz[], p_key text[], p_lo bigint[], p_hi bigint[], p_keys bigint[]
) RETURNS TABLE (kind text, key bigint, rows bigint, checksum numeric)
LANGUAGE plpgsql VOLATILE AS $$
#variable_conflict use_column
BEGIN
    INSERT INTO messages (dialog_key, user_lo, user_hi, id, from_lo, text, created_at, idempotency_key)
    SELECT * FROM unnest(p_dialog_key, p_user_lo, p_user_hi, p_id, p_from_lo, p_text, p_created_at, p_key)
    ON CONFLICT DO NOTHING;
    RETURN QUERY SELECT * FROM digests(p_lo, p_hi, p_keys);
END $$;
