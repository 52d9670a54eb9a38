-- A replicated shard's Patroni REST API URLs, one per member (empty: one server, no
-- Patroni). The admin API's switchover asks them; nothing else depends on them.
ALTER TABLE shards ADD COLUMN patroni_urls text[] NOT NULL DEFAULT '{}';
