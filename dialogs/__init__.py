"""What the proxy and the workers share: hashing, the ring, shard maps, migration planning,
the wire format, errors, settings, and the metadata store.

Pure modules: ``keys``, ``ring``, ``shard_map``, ``migration_plan``, ``wire``, ``checks``
(the rules input is checked by), ``errors``, ``settings``, ``logs``, ``aio``.
Those that do I/O: ``metastore/`` (the metadata database), ``schema/`` (upgrades of both
databases), ``watch`` (LISTEN/NOTIFY with polling), ``heartbeat`` (registrations),
``http`` and ``serve`` (aiohttp plumbing shared by both services).
"""
