-- One row per message. A dialog is the ordered pair (user_lo < user_hi); dialog_key is the
-- ring position of that pair. The primary key leads with dialog_key, so a dialog is one
-- contiguous stretch of the index: the list query is a backward index scan with every
-- condition in the index (no filter, no sort), and resharding copies by key ranges.
-- The pair is in the key because 64-bit positions can collide between two dialogs.
CREATE TABLE messages (
    dialog_key      bigint NOT NULL,
    user_lo         uuid NOT NULL,
    user_hi         uuid NOT NULL,
    id              bigint NOT NULL,
    from_lo         boolean NOT NULL,   -- the sender is user_lo (else user_hi)
    text            text NOT NULL,
    created_at      timestamptz NOT NULL,
    idempotency_key text,
    PRIMARY KEY (dialog_key, user_lo, user_hi, id),
    CHECK (user_lo <= user_hi)
);

-- dialog_key determines the pair; without this the planner multiplies the three equality
-- selectivities, underestimates a long dialog ~100x and sorts all of it instead of
-- reading the newest rows off the index.
CREATE STATISTICS messages_dialog_dependencies (dependencies) ON dialog_key, user_lo, user_hi FROM messages;

-- A retried send with the same Idempotency-Key stores one message. The key travels with
-- the row, so it still deduplicates after the dialog moved to another shard.
CREATE UNIQUE INDEX messages_idempotency ON messages (dialog_key, user_lo, user_hi, from_lo, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- CACHE 1 (the default) keeps nextval increasing across connections in call order.
CREATE SEQUENCE message_seq;

-- Message ids: (logical milliseconds << 22) | (sequence mod 2**22).
-- The millisecond part is the wall clock since 2025-01-01, but always past the newest
-- message of the dialog: a send made after another was acknowledged gets a larger id even
-- when the dialog moved here from a server whose clock runs ahead. Rows of one statement
-- that share a millisecond differ in their sequence bits, so the primary key stays unique.
CREATE FUNCTION next_message_id(p_dialog_key bigint, p_lo uuid, p_hi uuid) RETURNS bigint
LANGUAGE sql VOLATILE AS $$
    SELECT (GREATEST(
                (extract(epoch FROM clock_timestamp()) * 1000)::bigint - 1735689600000,
                coalesce((SELECT max(id) >> 22 FROM messages
                          WHERE dialog_key = p_dialog_key AND user_lo = p_lo AND user_hi = p_hi), -1) + 1
            ) << 22) | (nextval('message_seq') & 4194303)
$$;
