-- Each dialog's state (docs/inbox.md): how many messages each side has sent, each side's
-- read mark (a message id of the dialog; 0 before any) with how many of the other side's
-- messages it covered when it was set, and a version that every change bumps. Side X's
-- unread count is sent_other - read_count_x, in O(1).
--
-- Sends and read marks of a dialog serialise on its row (a send's group commit updates it
-- once per dialog in the same transaction as the messages; a read mark locks it before it
-- counts), so the counts are exact. The row lives with the dialog's messages and moves
-- with them at a resharding (copied, caught up by its delta entries, verified, deleted).
CREATE TABLE dialog_state (
    dialog_key    bigint NOT NULL,
    user_lo       uuid NOT NULL,
    user_hi       uuid NOT NULL,
    version       bigint NOT NULL,
    sent_lo       bigint NOT NULL DEFAULT 0,
    sent_hi       bigint NOT NULL DEFAULT 0,
    read_lo       bigint NOT NULL DEFAULT 0,   -- user_lo's read mark
    read_hi       bigint NOT NULL DEFAULT 0,   -- user_hi's read mark
    read_count_lo bigint NOT NULL DEFAULT 0,   -- user_hi's messages user_lo has read
    read_count_hi bigint NOT NULL DEFAULT 0,   -- user_lo's messages user_hi has read
    PRIMARY KEY (dialog_key, user_lo, user_hi)
) WITH (fillfactor = 80);  -- room on each page for the next version: updates stay HOT (no index write)

INSERT INTO dialog_state (dialog_key, user_lo, user_hi, version, sent_lo, sent_hi)
SELECT dialog_key, user_lo, user_hi, 1, count(*) FILTER (WHERE from_lo), count(*) FILTER (WHERE NOT from_lo)
FROM messages GROUP BY dialog_key, user_lo, user_hi;

-- Sent counts recounted from the messages, behind the exclusive fence (no send in flight).
-- Run once in a transaction of its own right after this upgrade commits (schema.upgrade_shard):
-- a send that another worker made with the previous store_messages while this upgrade ran
-- stored its message without counting it; once the new function is committed, sends that
-- started before have finished when the fence is had, and later ones count themselves.
CREATE FUNCTION recount_dialog_states() RETURNS void LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(7236281096744167283);
    INSERT INTO dialog_state AS s (dialog_key, user_lo, user_hi, version, sent_lo, sent_hi)
    SELECT dialog_key, user_lo, user_hi, 1, count(*) FILTER (WHERE from_lo), count(*) FILTER (WHERE NOT from_lo)
    FROM messages GROUP BY dialog_key, user_lo, user_hi ORDER BY 1, 2, 3
    ON CONFLICT (dialog_key, user_lo, user_hi) DO UPDATE
    SET sent_lo = EXCLUDED.sent_lo, sent_hi = EXCLUDED.sent_hi, version = s.version + 1
    WHERE (s.sent_lo, s.sent_hi) IS DISTINCT FROM (EXCLUDED.sent_lo, EXCLUDED.sent_hi);
END $$;

-- The hash of a state row in the digests that verify a migration (added to the messages').
CREATE FUNCTION state_hash(s dialog_state) RETURNS bigint LANGUAGE sql IMMUTABLE AS $$
    SELECT hashtextextended(concat_ws('|', 'state', s.dialog_key, s.user_lo, s.user_hi, s.version, s.sent_lo,
                                      s.sent_hi, s.read_lo, s.read_hi, s.read_count_lo, s.read_count_hi), 0)
$$;

-- store_messages as in 0005, and each dialog's state updated once per call. The rows are
-- locked in key order: two calls touching the same dialogs cannot deadlock.
CREATE OR REPLACE FUNCTION store_messages(
    p_dialog_key bigint[], p_lo uuid[], p_hi uuid[], p_from_lo boolean[], p_text text[], p_key text[]
) RETURNS TABLE (ord bigint, id bigint, created_at timestamptz, status text)
LANGUAGE plpgsql VOLATILE AS $$
#variable_conflict use_column
BEGIN
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
    ), inserted AS MATERIALIZED (
        INSERT INTO messages AS m (dialog_key, user_lo, user_hi, id, from_lo, text, created_at, idempotency_key)
        SELECT n.dialog_key, n.user_lo, n.user_hi, n.id, n.from_lo, n.text, n.created_at, n.idempotency_key
        FROM numbered n
        ON CONFLICT (dialog_key, user_lo, user_hi, from_lo, idempotency_key) WHERE idempotency_key IS NOT NULL
        DO NOTHING
        RETURNING m.dialog_key, m.user_lo, m.user_hi, m.id, m.from_lo
    ), logged AS (
        INSERT INTO migration_delta (dialog_key, user_lo, user_hi, id)
        SELECT ins.dialog_key, ins.user_lo, ins.user_hi, ins.id
        FROM inserted ins JOIN numbered n USING (dialog_key, user_lo, user_hi, id)
        WHERE n.state = 'migrating'
    ), counted AS (
        INSERT INTO dialog_state AS s (dialog_key, user_lo, user_hi, version, sent_lo, sent_hi)
        SELECT ins.dialog_key, ins.user_lo, ins.user_hi, 1,
               count(*) FILTER (WHERE ins.from_lo), count(*) FILTER (WHERE NOT ins.from_lo)
        FROM inserted ins
        GROUP BY ins.dialog_key, ins.user_lo, ins.user_hi
        ORDER BY ins.dialog_key, ins.user_lo, ins.user_hi
        ON CONFLICT (dialog_key, user_lo, user_hi) DO UPDATE
        SET version = s.version + 1, sent_lo = s.sent_lo + EXCLUDED.sent_lo, sent_hi = s.sent_hi + EXCLUDED.sent_hi
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

-- A read mark: p_reader_lo's side has read the dialog up to message p_up_to (NULL: its
-- newest message). Behind the shared fence like a send, and refused the same way while
-- the range is frozen or not served here. Marks only move forward: an older mark leaves
-- the stored one; every mark recounts (a message that committed late below the mark, from
-- two workers racing in one dialog, is then read). In a migrating range a change logs the mark's message in the delta, so the
-- catch-up copies the state with it.
-- status: marked | frozen | not_served | no_message (p_up_to is not a message of the dialog).
CREATE FUNCTION mark_read(p_dialog_key bigint, p_lo uuid, p_hi uuid, p_reader_lo boolean, p_up_to bigint)
RETURNS TABLE (status text, up_to bigint, unread bigint)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_state text;
    s dialog_state;
    v_mark bigint;
    v_read bigint;
    v_other_sent bigint;
    v_old_mark bigint;
    v_old_read bigint;
BEGIN
    PERFORM pg_advisory_xact_lock_shared(7236281096744167283);
    v_state := range_state(p_dialog_key);
    IF v_state IS NULL OR v_state = 'incoming' THEN
        RETURN QUERY SELECT 'not_served', NULL::bigint, NULL::bigint;
        RETURN;
    ELSIF v_state IN ('frozen', 'leaving') THEN
        RETURN QUERY SELECT 'frozen', NULL::bigint, NULL::bigint;
        RETURN;
    END IF;
    SELECT * INTO s FROM dialog_state d
    WHERE d.dialog_key = p_dialog_key AND d.user_lo = p_lo AND d.user_hi = p_hi FOR UPDATE;
    IF NOT FOUND THEN  -- no message yet: nothing to read, nothing a mark could name
        RETURN QUERY SELECT CASE WHEN p_up_to IS NULL THEN 'marked' ELSE 'no_message' END, NULL::bigint, 0::bigint;
        RETURN;
    END IF;
    IF p_up_to IS NULL THEN
        SELECT max(m.id) INTO v_mark FROM messages m
        WHERE m.dialog_key = p_dialog_key AND m.user_lo = p_lo AND m.user_hi = p_hi;
    ELSIF EXISTS (SELECT 1 FROM messages m WHERE m.dialog_key = p_dialog_key AND m.user_lo = p_lo
                  AND m.user_hi = p_hi AND m.id = p_up_to) THEN
        v_mark := p_up_to;
    ELSE
        RETURN QUERY SELECT 'no_message', NULL::bigint, NULL::bigint;
        RETURN;
    END IF;
    -- (Into variables: plpgsql ends an IF's condition at the first THEN, also a CASE's.)
    v_other_sent := CASE WHEN p_reader_lo THEN s.sent_hi ELSE s.sent_lo END;
    v_old_mark := CASE WHEN p_reader_lo THEN s.read_lo ELSE s.read_hi END;
    v_old_read := CASE WHEN p_reader_lo THEN s.read_count_lo ELSE s.read_count_hi END;
    IF v_mark < v_old_mark THEN  -- an older mark: the stored one stands (and is recounted)
        v_mark := v_old_mark;
    END IF;
    -- The other side's messages at or below the mark: all of theirs but those above it.
    -- Recounted on every mark: a message that committed late below the mark is then read.
    v_read := v_other_sent - (SELECT count(*) FROM messages m
                              WHERE m.dialog_key = p_dialog_key AND m.user_lo = p_lo AND m.user_hi = p_hi
                                AND m.id > v_mark AND m.from_lo <> p_reader_lo);
    IF v_mark <> v_old_mark OR v_read <> v_old_read THEN
        IF p_reader_lo THEN
            UPDATE dialog_state d SET read_lo = v_mark, read_count_lo = v_read, version = d.version + 1
            WHERE d.dialog_key = p_dialog_key AND d.user_lo = p_lo AND d.user_hi = p_hi;
        ELSE
            UPDATE dialog_state d SET read_hi = v_mark, read_count_hi = v_read, version = d.version + 1
            WHERE d.dialog_key = p_dialog_key AND d.user_lo = p_lo AND d.user_hi = p_hi;
        END IF;
        IF v_state = 'migrating' THEN
            INSERT INTO migration_delta (dialog_key, user_lo, user_hi, id) VALUES (p_dialog_key, p_lo, p_hi, v_mark);
        END IF;
    END IF;
    RETURN QUERY SELECT 'marked', v_mark, v_other_sent - v_read;
END $$;

-- Digests (0004) with the dialogs' state rows: count and hash sum of messages plus states.
-- Digests still add up (a range's is the sum of its dialogs'), which verification relies on.
CREATE OR REPLACE FUNCTION range_digests(p_lo bigint[], p_hi bigint[])
RETURNS TABLE (lo bigint, rows bigint, checksum numeric)
LANGUAGE sql STABLE AS $$
    SELECT r.lo, m.rows + s.rows, m.checksum + s.checksum
    FROM unnest(p_lo, p_hi) AS r(lo, hi)
    CROSS JOIN LATERAL (
        SELECT count(*) AS rows,
               coalesce(sum(hashtextextended(concat_ws('|', m.dialog_key, m.user_lo, m.user_hi, m.id, m.from_lo,
                        m.text, (extract(epoch FROM m.created_at) * 1000000)::bigint, m.idempotency_key), 0)::numeric),
                        0) AS checksum
        FROM messages m WHERE m.dialog_key BETWEEN r.lo AND r.hi
    ) AS m
    CROSS JOIN LATERAL (
        SELECT count(*) AS rows, coalesce(sum(state_hash(s)::numeric), 0) AS checksum
        FROM dialog_state s WHERE s.dialog_key BETWEEN r.lo AND r.hi
    ) AS s
$$;

CREATE OR REPLACE FUNCTION dialog_digests(p_keys bigint[])
RETURNS TABLE (dialog_key bigint, rows bigint, checksum numeric)
LANGUAGE sql STABLE AS $$
    SELECT k.key, m.rows + s.rows, m.checksum + s.checksum
    FROM unnest(p_keys) AS k(key)
    CROSS JOIN LATERAL (
        SELECT count(*) AS rows,
               coalesce(sum(hashtextextended(concat_ws('|', m.dialog_key, m.user_lo, m.user_hi, m.id, m.from_lo,
                        m.text, (extract(epoch FROM m.created_at) * 1000000)::bigint, m.idempotency_key), 0)::numeric),
                        0) AS checksum
        FROM messages m WHERE m.dialog_key = k.key
    ) AS m
    CROSS JOIN LATERAL (
        SELECT count(*) AS rows, coalesce(sum(state_hash(s)::numeric), 0) AS checksum
        FROM dialog_state s WHERE s.dialog_key = k.key
    ) AS s
$$;

-- Copied state rows (a JSON array of dialog_state rows): a newer version replaces an older
-- one, never the reverse (a state read later than a copy of it may arrive first). Locked in
-- key order, as store_messages does.
CREATE FUNCTION upsert_states(p_states jsonb) RETURNS void LANGUAGE sql VOLATILE AS $$
    INSERT INTO dialog_state AS s
    SELECT * FROM jsonb_populate_recordset(NULL::dialog_state, p_states) ORDER BY 1, 2, 3
    ON CONFLICT (dialog_key, user_lo, user_hi) DO UPDATE
    SET version = EXCLUDED.version, sent_lo = EXCLUDED.sent_lo, sent_hi = EXCLUDED.sent_hi,
        read_lo = EXCLUDED.read_lo, read_hi = EXCLUDED.read_hi,
        read_count_lo = EXCLUDED.read_count_lo, read_count_hi = EXCLUDED.read_count_hi
    WHERE EXCLUDED.version > s.version
$$;

-- apply_and_digest (0004) with the dialogs' states: messages, then states, then digests.
DROP FUNCTION apply_and_digest(bigint[], uuid[], uuid[], bigint[], boolean[], text[], timestamptz[], text[], bigint[],
                               bigint[], bigint[]);
CREATE FUNCTION apply_and_digest(
    p_dialog_key bigint[], p_user_lo uuid[], p_user_hi uuid[], p_id bigint[], p_from_lo boolean[], p_text text[],
    p_created_at timestamptz[], p_key text[], p_states jsonb, p_lo bigint[], p_hi bigint[], p_keys bigint[]
) RETURNS TABLE (kind text, key bigint, rows bigint, checksum numeric)
LANGUAGE plpgsql VOLATILE AS $$
#variable_conflict use_column
BEGIN
    INSERT INTO messages (dialog_key, user_lo, user_hi, id, from_lo, text, created_at, idempotency_key)
    SELECT * FROM unnest(p_dialog_key, p_user_lo, p_user_hi, p_id, p_from_lo, p_text, p_created_at, p_key)
    ON CONFLICT DO NOTHING;
    PERFORM upsert_states(p_states);
    RETURN QUERY SELECT * FROM digests(p_lo, p_hi, p_keys);
END $$;
