-- Users of the social network slice this subsystem serves on its own.
CREATE TABLE users (
    id            uuid PRIMARY KEY,
    first_name    text NOT NULL,
    second_name   text NOT NULL,
    birthdate     date,
    biography     text NOT NULL DEFAULT '',
    city          text NOT NULL DEFAULT '',
    password_hash text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);
-- Prefix search on both names (LIKE 'abc%') uses this index under any collation.
CREATE INDEX users_names_prefix ON users (first_name text_pattern_ops, second_name text_pattern_ops);

-- Every shard database the cluster has ever been told about.
CREATE TABLE shards (
    shard_id   text PRIMARY KEY,
    dsn        text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Versioned shard maps. The highest version is the active one; a new version is only
-- written on top of the latest (see dialogs.metastore.maps.activate).
CREATE TABLE shard_maps (
    map_version bigint PRIMARY KEY CHECK (map_version > 0),
    shards      jsonb NOT NULL,
    vnodes_base integer NOT NULL,
    reason      text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION notify_shard_map() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('dialogs_map', NEW.map_version::text);
    RETURN NEW;
END $$;
CREATE TRIGGER shard_maps_notify AFTER INSERT ON shard_maps
    FOR EACH ROW EXECUTE FUNCTION notify_shard_map();

-- Workers register themselves and keep heartbeat_at fresh; proxies route to live ones.
CREATE TABLE workers (
    worker_id    text PRIMARY KEY,
    shard_id     text NOT NULL REFERENCES shards,
    url          text NOT NULL,
    map_version  bigint NOT NULL DEFAULT 0,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX workers_shard ON workers (shard_id);

-- Heartbeats only notify when something a proxy routes by changes.
CREATE FUNCTION notify_workers() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('dialogs_workers', OLD.shard_id);
    ELSIF TG_OP = 'INSERT' OR NEW.url IS DISTINCT FROM OLD.url OR NEW.shard_id IS DISTINCT FROM OLD.shard_id THEN
        PERFORM pg_notify('dialogs_workers', NEW.shard_id);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER workers_notify AFTER INSERT OR UPDATE OR DELETE ON workers
    FOR EACH ROW EXECUTE FUNCTION notify_workers();
