-- The inbox (docs/inbox.md): each user's conversations, newest first, with the last
-- message and the user's unread count, and a badge total; on the shard that owns the
-- *user's* key (keys.user_key) on the same ring, so a page or a total is one shard's read.
--
-- It is a projection of the dialogs' states (dialog_state, on the dialogs' shards):
-- a change of a dialog writes a row into inbox_outbox in its own transaction; an applier
-- (in the dialog shard's workers) reads each announced dialog's snapshot and applies it to
-- both users' shards with apply_inbox(), which keeps a row only if its version is newer.
-- A snapshot is a value, not an increment: applying it twice or late changes nothing.
CREATE TABLE inbox (
    user_key        bigint NOT NULL,   -- keys.user_key(owner)
    owner           uuid NOT NULL,
    peer            uuid NOT NULL,
    version         bigint NOT NULL,   -- the dialog_state version this row projects
    last_id         bigint NOT NULL,
    last_from_owner boolean NOT NULL,
    last_text       text NOT NULL,
    last_at         timestamptz NOT NULL,
    unread          bigint NOT NULL,   -- the owner's unread messages in this dialog
    PRIMARY KEY (user_key, owner, peer)
) WITH (fillfactor = 80);
-- A page: the owner's conversations by their last message, newest first.
CREATE INDEX inbox_recent ON inbox (user_key, owner, last_id DESC);

-- The badge: sum(unread) and count(unread > 0) of the owner's rows, kept in the same
-- transaction as every change of them. Its row is also the lock every change of the
-- owner's inbox rows takes first (apply_inbox), so changes of one owner never interleave.
CREATE TABLE inbox_totals (
    user_key bigint NOT NULL,
    owner    uuid NOT NULL,
    unread   bigint NOT NULL DEFAULT 0,
    dialogs  bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (user_key, owner)
);

-- "This dialog changed": written by store_messages and mark_read in their transaction,
-- deleted by the applier once the dialog's snapshot (or a newer one) is applied.
CREATE TABLE inbox_outbox (
    seq        bigserial PRIMARY KEY,
    dialog_key bigint NOT NULL,
    user_lo    uuid NOT NULL,
    user_hi    uuid NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Keys of inbox rows changed in migrating ranges, for a migration's catch-up (as
-- migration_delta is for messages; same (xid, seq) order and horizon rule).
CREATE TABLE inbox_delta (
    seq      bigserial PRIMARY KEY,
    xid      bigint NOT NULL DEFAULT (pg_current_xact_id()::text::bigint),
    user_key bigint NOT NULL,
    owner    uuid NOT NULL,
    peer     uuid NOT NULL
);
CREATE INDEX inbox_delta_order ON inbox_delta (xid, seq);

-- Every dialog announced once, so an existing deployment builds its inboxes from its
-- dialogs: run by schema.upgrade_shard right after this upgrade commits, behind the
-- exclusive fence (a send another worker made with the previous store_messages while the
-- upgrade ran is committed by then, and later ones announce themselves).
CREATE FUNCTION announce_dialogs() RETURNS bigint LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_count bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(7236281096744167283);
    INSERT INTO inbox_outbox (dialog_key, user_lo, user_hi)
    SELECT dialog_key, user_lo, user_hi FROM dialog_state ORDER BY 1, 2, 3;
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_count;
END $$;

-- store_messages as in 0006, and each dialog it changed announced in the outbox.
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
        RETURNING s.dialog_key, s.user_lo, s.user_hi
    ), announced AS (
        INSERT INTO inbox_outbox (dialog_key, user_lo, user_hi)
        SELECT c.dialog_key, c.user_lo, c.user_hi FROM counted c
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

-- mark_read as in 0006, and a changed state announced in the outbox.
CREATE OR REPLACE FUNCTION mark_read(p_dialog_key bigint, p_lo uuid, p_hi uuid, p_reader_lo boolean, p_up_to bigint)
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
        INSERT INTO inbox_outbox (dialog_key, user_lo, user_hi) VALUES (p_dialog_key, p_lo, p_hi);
    END IF;
    RETURN QUERY SELECT 'marked', v_mark, v_other_sent - v_read;
END $$;

-- Apply inbox rows (a JSON array of inbox rows) on the owner's shard. A row is kept only if
-- its version is newer than the stored one; each owner's total moves by the difference of
-- its changed rows in the same transaction. Behind the shared fence like a send:
--   applied     (or superseded: a newer row is stored)
--   frozen      the owner's range is in a cutover: try again shortly
--   not_served  this shard does not serve the owner's key (a newer map routes elsewhere)
-- p_copy: a migration's copy to its target, which takes rows for any range it holds
-- (its 'incoming' ranges before the flip); the applier's rows go to owned and migrating
-- ranges only, and in a migrating range each change logs its key in inbox_delta.
CREATE FUNCTION apply_inbox(p_rows jsonb, p_copy boolean DEFAULT false)
RETURNS TABLE (user_key bigint, owner uuid, peer uuid, status text)
LANGUAGE plpgsql VOLATILE AS $$
#variable_conflict use_column
DECLARE
    v_rows inbox[];
BEGIN
    PERFORM pg_advisory_xact_lock_shared(7236281096744167283);
    -- The newest row of each (owner, peer) among those this shard takes, in key order.
    SELECT coalesce(array_agg(r ORDER BY r.user_key, r.owner, r.peer), '{}') INTO v_rows
    FROM (SELECT DISTINCT ON (j.user_key, j.owner, j.peer) j.*
          FROM jsonb_populate_recordset(NULL::inbox, p_rows) j
          WHERE CASE WHEN p_copy THEN range_state(j.user_key) IS NOT NULL
                     ELSE range_state(j.user_key) IN ('owned', 'migrating') END
          ORDER BY j.user_key, j.owner, j.peer, j.version DESC) r;
    IF cardinality(v_rows) > 0 THEN
        -- Each owner's total row, locked in key order (created if new): whoever changes an
        -- owner's rows holds it, so the statement below reads rows nobody else is changing.
        INSERT INTO inbox_totals AS t (user_key, owner)
        SELECT DISTINCT r.user_key, r.owner FROM unnest(v_rows) r ORDER BY 1, 2
        ON CONFLICT (user_key, owner) DO UPDATE SET unread = t.unread;
        -- Each changed row's old count from the upsert itself (RETURNING old: PostgreSQL
        -- 18): a separate read would be a second lookup per row, which the planner may make
        -- by the (user_key, owner) prefix of the page index: a user's whole inbox per row.
        WITH changed AS (
            INSERT INTO inbox AS i SELECT * FROM unnest(v_rows) ORDER BY user_key, owner, peer
            ON CONFLICT (user_key, owner, peer) DO UPDATE
            SET version = EXCLUDED.version, last_id = EXCLUDED.last_id, last_from_owner = EXCLUDED.last_from_owner,
                last_text = EXCLUDED.last_text, last_at = EXCLUDED.last_at, unread = EXCLUDED.unread
            WHERE i.version < EXCLUDED.version
            RETURNING new.user_key, new.owner, new.peer, new.unread, coalesce(old.unread, 0) AS old_unread
        ), logged AS (
            INSERT INTO inbox_delta (user_key, owner, peer)
            SELECT c.user_key, c.owner, c.peer FROM changed c WHERE NOT p_copy AND range_state(c.user_key) = 'migrating'
        ), moved AS (
            SELECT c.user_key, c.owner,
                   sum(c.unread - c.old_unread) AS unread,
                   sum((c.unread > 0)::int - (c.old_unread > 0)::int) AS dialogs
            FROM changed c
            GROUP BY c.user_key, c.owner
        )
        UPDATE inbox_totals t SET unread = t.unread + m.unread, dialogs = t.dialogs + m.dialogs
        FROM moved m WHERE t.user_key = m.user_key AND t.owner = m.owner;
    END IF;
    RETURN QUERY
    SELECT j.user_key, j.owner, j.peer,
           CASE WHEN s.state IS NULL OR (s.state = 'incoming' AND NOT p_copy) THEN 'not_served'
                WHEN s.state IN ('frozen', 'leaving') AND NOT p_copy THEN 'frozen'
                ELSE 'applied' END
    FROM jsonb_populate_recordset(NULL::inbox, p_rows) j, LATERAL (SELECT range_state(j.user_key) AS state) s;
END $$;

-- The hash of an inbox row, in the digests that verify a migration's copy of the inbox.
-- The time as microseconds since the epoch: its text form would follow each session's
-- TimeZone and DateStyle, and two servers configured apart would never match.
CREATE FUNCTION inbox_hash(i inbox) RETURNS bigint LANGUAGE sql IMMUTABLE AS $$
    SELECT hashtextextended(concat_ws('|', 'inbox', i.user_key, i.owner, i.peer, i.version, i.last_id,
                                      i.last_from_owner, i.last_text,
                                      (extract(epoch FROM i.last_at) * 1000000)::bigint, i.unread), 0)
$$;

-- The hash of a total row (owner, unread, dialogs).
CREATE FUNCTION inbox_total_hash(t inbox_totals) RETURNS bigint LANGUAGE sql IMMUTABLE AS $$
    SELECT hashtextextended(concat_ws('|', 'total', t.user_key, t.owner, t.unread, t.dialogs), 0)
$$;

-- Per range (by its lo): count and hash sum of the inbox rows and totals in it, for a
-- migration's comparison of a source with its target (docs/resharding.md).
CREATE FUNCTION inbox_range_digests(p_lo bigint[], p_hi bigint[])
RETURNS TABLE (lo bigint, rows bigint, checksum numeric) LANGUAGE sql STABLE AS $$
    SELECT r.lo, count(h.h), coalesce(sum(h.h), 0)
    FROM unnest(p_lo, p_hi) AS r(lo, hi)
    LEFT JOIN LATERAL (
        SELECT inbox_hash(i) AS h FROM inbox i WHERE i.user_key BETWEEN r.lo AND r.hi
        UNION ALL
        SELECT inbox_total_hash(t) FROM inbox_totals t WHERE t.user_key BETWEEN r.lo AND r.hi
    ) AS h ON true
    GROUP BY r.lo
$$;

-- The same for given rows (user_key, owner, peer) and their owners' totals.
CREATE FUNCTION inbox_key_digest(p_key bigint[], p_owner uuid[], p_peer uuid[])
RETURNS TABLE (rows bigint, checksum numeric) LANGUAGE sql STABLE AS $$
    SELECT count(*), coalesce(sum(h), 0) FROM (
        SELECT inbox_hash(i) AS h
        FROM (SELECT DISTINCT * FROM unnest(p_key, p_owner, p_peer) AS k(user_key, owner, peer)) AS k
        JOIN inbox i USING (user_key, owner, peer)
        UNION ALL
        SELECT inbox_total_hash(t)
        FROM (SELECT DISTINCT * FROM unnest(p_key, p_owner) AS k(user_key, owner)) AS k
        JOIN inbox_totals t USING (user_key, owner)
    ) AS hashes
$$;

-- Late writes (docs/resharding.md, "The lease on a cutover"): a source whose lease ran out
-- after the flip took sends or read marks that its dialog's new shard did not see, while
-- that shard took its own. Their states cannot be ordered by version (both went on from
-- the one copied at the cutover): merge them on the new shard, after its copy of the late
-- messages, in the same transaction. Marks: the greater of the two (marks only move
-- forward); counts: recounted from the messages, now all here; version: past both. Each
-- merged dialog is announced, so the inbox follows.
CREATE FUNCTION merge_states(p_states jsonb) RETURNS void LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    -- This shard's rows first, in key order (sends and marks here wait meanwhile).
    PERFORM 1 FROM dialog_state s
    JOIN jsonb_populate_recordset(NULL::dialog_state, p_states) i USING (dialog_key, user_lo, user_hi)
    ORDER BY s.dialog_key, s.user_lo, s.user_hi FOR UPDATE OF s;
    WITH merged AS (
        SELECT i.dialog_key, i.user_lo, i.user_hi,
               greatest(i.version, coalesce(t.version, 0)) + 1 AS version,
               greatest(i.read_lo, coalesce(t.read_lo, 0)) AS read_lo,
               greatest(i.read_hi, coalesce(t.read_hi, 0)) AS read_hi
        FROM jsonb_populate_recordset(NULL::dialog_state, p_states) i
        LEFT JOIN dialog_state t USING (dialog_key, user_lo, user_hi)
    ), counted AS (
        SELECT m.*, c.*
        FROM merged m CROSS JOIN LATERAL (
            SELECT count(*) FILTER (WHERE x.from_lo) AS sent_lo, count(*) FILTER (WHERE NOT x.from_lo) AS sent_hi,
                   count(*) FILTER (WHERE NOT x.from_lo AND x.id <= m.read_lo) AS read_count_lo,
                   count(*) FILTER (WHERE x.from_lo AND x.id <= m.read_hi) AS read_count_hi
            FROM messages x
            WHERE x.dialog_key = m.dialog_key AND x.user_lo = m.user_lo AND x.user_hi = m.user_hi
        ) AS c
    ), stored AS (
        INSERT INTO dialog_state AS s (dialog_key, user_lo, user_hi, version, sent_lo, sent_hi, read_lo, read_hi,
                                       read_count_lo, read_count_hi)
        SELECT dialog_key, user_lo, user_hi, version, sent_lo, sent_hi, read_lo, read_hi, read_count_lo, read_count_hi
        FROM counted ORDER BY 1, 2, 3
        ON CONFLICT (dialog_key, user_lo, user_hi) DO UPDATE
        SET version = EXCLUDED.version, sent_lo = EXCLUDED.sent_lo, sent_hi = EXCLUDED.sent_hi,
            read_lo = EXCLUDED.read_lo, read_hi = EXCLUDED.read_hi,
            read_count_lo = EXCLUDED.read_count_lo, read_count_hi = EXCLUDED.read_count_hi
        RETURNING s.dialog_key, s.user_lo, s.user_hi
    )
    INSERT INTO inbox_outbox (dialog_key, user_lo, user_hi) SELECT * FROM stored;
END $$;
