-- One row per message. Both directions of a dialog share dialog_key (the ring position
-- of the unordered pair), so a dialog is one contiguous stretch of the primary key:
-- the list query is a backward index scan, and resharding copies by (dialog_key, id).
CREATE TABLE messages (
    dialog_key      bigint NOT NULL,
    id              bigint NOT NULL,
    from_user       uuid NOT NULL,
    to_user         uuid NOT NULL,
    text            text NOT NULL,
    created_at      timestamptz NOT NULL,
    idempotency_key text,
    PRIMARY KEY (dialog_key, id)
);

-- A retried send with the same Idempotency-Key stores one message. The key travels with
-- the row, so it still deduplicates after the dialog moved to another shard.
CREATE UNIQUE INDEX messages_idempotency ON messages (dialog_key, from_user, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- CACHE 1 (the default) keeps nextval increasing across connections in call order.
CREATE SEQUENCE message_seq;

-- Message ids: (logical milliseconds << 22) | (sequence mod 2**22).
-- The millisecond part is the wall clock since 2025-01-01, but always past the newest
-- message of the dialog: a send made after another was acknowledged gets a larger id even
-- when the dialog moved here from a server whose clock runs ahead. Rows of one statement
-- that share a millisecond differ in their sequence bits, so (dialog_key, id) stays unique.
CREATE FUNCTION next_message_id(p_dialog_key bigint) RETURNS bigint LANGUAGE sql VOLATILE AS $$
    SELECT (GREATEST(
                (extract(epoch FROM clock_timestamp()) * 1000)::bigint - 1735689600000,
                coalesce((SELECT max(id) >> 22 FROM messages WHERE dialog_key = p_dialog_key), -1) + 1
            ) << 22) | (nextval('message_seq') & 4194303)
$$;
