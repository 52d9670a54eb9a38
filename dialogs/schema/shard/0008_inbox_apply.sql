-- apply_inbox (0007) in one statement, with what it does per row cut to the rows' work
-- (profiled under 32 senders: the 0007 body spent more on its bookkeeping than on the rows):
--   - each user key's range state is read once per call (0007 read it three times per row);
--   - an owner's total moves by the sum of its changed rows' differences in one upsert, and
--     only if that sum is not zero (0007 first locked the total row with a write of its own,
--     then wrote it again: two row versions per owner per call, also for a sender whose
--     count did not move).
-- The result is the same: a row is kept only if its version is newer than the stored one,
-- and inbox_totals.unread = sum(inbox.unread) (dialogs = count(unread > 0)) holds after
-- every commit. Why without the lock on the total row first: each changed row's old count
-- is read by the upsert that changes it, under that row's lock (RETURNING old), so its
-- difference is exact whoever else changes the owner's other rows meanwhile; and adding to
-- the total is itself done under the total row's lock (an upsert), so additions of two
-- transactions cannot lose one another. Locks are taken in key order (inbox rows, then
-- total rows), so two callers cannot deadlock. A total row is created with the owner's
-- first row (its insert takes the differences as they are, also zeros).
CREATE OR REPLACE FUNCTION apply_inbox(p_rows jsonb, p_copy boolean DEFAULT false)
RETURNS TABLE (user_key bigint, owner uuid, peer uuid, status text)
LANGUAGE plpgsql VOLATILE AS $$
#variable_conflict use_column
BEGIN
    PERFORM pg_advisory_xact_lock_shared(7236281096744167283);
    RETURN QUERY
    WITH given AS MATERIALIZED (
        SELECT j.* FROM jsonb_populate_recordset(NULL::inbox, p_rows) j
    ), keyed AS MATERIALIZED (
        SELECT k.user_key, range_state(k.user_key) AS state FROM (SELECT DISTINCT g.user_key FROM given g) k
    ), taken AS MATERIALIZED (
        -- The newest row of each (owner, peer) among those this shard takes.
        SELECT DISTINCT ON (g.user_key, g.owner, g.peer) g.*
        FROM given g JOIN keyed k USING (user_key)
        WHERE CASE WHEN p_copy THEN k.state IS NOT NULL ELSE k.state IN ('owned', 'migrating') END
        ORDER BY g.user_key, g.owner, g.peer, g.version DESC
    ), changed AS (
        INSERT INTO inbox AS i SELECT * FROM taken ORDER BY user_key, owner, peer
        ON CONFLICT (user_key, owner, peer) DO UPDATE
        SET version = EXCLUDED.version, last_id = EXCLUDED.last_id, last_from_owner = EXCLUDED.last_from_owner,
            last_text = EXCLUDED.last_text, last_at = EXCLUDED.last_at, unread = EXCLUDED.unread
        WHERE i.version < EXCLUDED.version
        RETURNING new.user_key, new.owner, new.peer, new.unread, coalesce(old.unread, 0) AS old_unread
    ), logged AS (
        INSERT INTO inbox_delta (user_key, owner, peer)
        SELECT c.user_key, c.owner, c.peer FROM changed c JOIN keyed k USING (user_key)
        WHERE NOT p_copy AND k.state = 'migrating'
    ), totalled AS (
        INSERT INTO inbox_totals AS t (user_key, owner, unread, dialogs)
        SELECT c.user_key, c.owner, sum(c.unread - c.old_unread)::bigint,
               sum((c.unread > 0)::int - (c.old_unread > 0)::int)::bigint
        FROM changed c
        GROUP BY c.user_key, c.owner
        ORDER BY c.user_key, c.owner
        ON CONFLICT (user_key, owner) DO UPDATE
        SET unread = t.unread + EXCLUDED.unread, dialogs = t.dialogs + EXCLUDED.dialogs
        WHERE EXCLUDED.unread <> 0 OR EXCLUDED.dialogs <> 0
    )
    SELECT g.user_key, g.owner, g.peer,
           CASE WHEN k.state IS NULL OR (k.state = 'incoming' AND NOT p_copy) THEN 'not_served'
                WHEN k.state IN ('frozen', 'leaving') AND NOT p_copy THEN 'frozen'
                ELSE 'applied' END
    FROM given g JOIN keyed k USING (user_key);
END $$;
