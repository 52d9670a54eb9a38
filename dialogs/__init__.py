"""What the proxy and the workers share: hashing, the ring, shard maps, wire format, errors.

Nothing in this package talks to a network; ``metadata`` and ``embedded`` are the only
modules that do I/O (the metadata database and the local PostgreSQL servers).
"""
