"""The routing proxy: public API, auth, the hash ring, forwarding to shard workers."""
