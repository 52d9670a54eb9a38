"""Which user ids exist, cached so that a send costs no metadata query in the common case."""

from __future__ import annotations

import collections
import logging
import uuid

from dialogs import errors
from dialogs.metastore.store import MetadataStore

log = logging.getLogger(__name__)


class KnownUsers:
    """An LRU set of user ids known to exist (users are never deleted, so it cannot go stale).

    When the metadata database is down, an unknown user is let through (a send is stored,
    a list is an empty page) rather than failing: routing must not depend on that
    database (see docs/architecture.md).
    """

    def __init__(self, store: MetadataStore, capacity: int = 100_000) -> None:
        self._store = store
        self._capacity = capacity
        self._known: collections.OrderedDict[uuid.UUID, None] = collections.OrderedDict()

    def add(self, user_id: uuid.UUID) -> None:
        self._known[user_id] = None
        self._known.move_to_end(user_id)
        if len(self._known) > self._capacity:
            self._known.popitem(last=False)

    async def ensure(self, user_id: uuid.UUID) -> None:
        if user_id in self._known:
            self._known.move_to_end(user_id)
            return
        try:
            exists = await self._store.user_exists(user_id)
        except errors.MetadataUnavailable:
            log.warning("metadata database down: cannot check that user %s exists; answering as if it does", user_id)
            return
        if not exists:
            raise errors.UserNotFound()
        self.add(user_id)
