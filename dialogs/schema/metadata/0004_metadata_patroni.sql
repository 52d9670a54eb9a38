-- The Patroni REST API of each member of the metadata database's own group, when it is
-- replicated (it is not a shard, so it has no row in `shards`). With shards.patroni_urls,
-- what GET /discovery/prometheus?role=patroni hands Prometheus: every member scraped,
-- a shard added later included, with no edit to prometheus.yml.
CREATE TABLE metadata_patroni_urls (url text PRIMARY KEY);
