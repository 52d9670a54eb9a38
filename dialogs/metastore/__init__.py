"""Every query of the metadata database, in one place (Vitess's topo store is the model).

- ``maps``: the shard registry and the versioned shard maps. A new map version is written
  only by compare-and-swap on the version (``maps.activate``), the one CAS of the store.
- ``members``: registrations and heartbeats of proxies and workers.
- ``users``: the users of the course API (register, login, get, search).
- ``migrations``: resharding migrations, their ranges and checkpoints, and the flip.

Functions take a connection (or, for users, a pool) and raise asyncpg's errors; callers
map those with ``dialogs.pg``.
"""
