"""The project's exceptions. Every error a client can see is one of these.

    DialogsError                    500  internal error (never raised on purpose)
    ├── InvalidInput                400  malformed JSON, bad UUID, text too long, bad limit/before
    ├── Unauthorized                401  missing, malformed or tampered token
    │   └── TokenExpired            401  a valid token past its exp
    ├── Forbidden                   403  authenticated, but not allowed (admin API)
    ├── NotFound                    404  no such route
    │   ├── UserNotFound            404  unknown user
    │   ├── ShardNotFound           404  a shard the shard map does not have
    │   ├── MigrationNotFound       404  unknown migration id
    │   └── MessageNotFound         404  a read mark names no message of the dialog
    ├── MethodNotAllowed            405  a known route, another method
    ├── RequestTimeout              408  the request body did not arrive in time
    ├── Conflict                    409  the request clashes with current state
    │   ├── StaleMap                409  (proxy <-> worker) routed with an older shard map
    │   ├── RangeMoving             409  (proxy <-> worker) the dialog's range is in cutover
    │   ├── RangeNotServed          409  (proxy <-> worker) this shard does not serve the range
    │   └── MapVersionConflict      409  another writer activated the next shard-map version first
    ├── BodyTooLarge                413  request body over the limit
    ├── IdempotencyKeyReused        422  same Idempotency-Key, different message
    ├── TooManyRequests             429  too many failed logins (carries Retry-After)
    └── Unavailable                 503  try again later (carries Retry-After)
        ├── ShardUnavailable        503  the owning shard's workers or database are down
        ├── MetadataUnavailable     503  the metadata database is down (users, login)
        ├── SendOutcomeUnknown      503  the shard failed during a write: it may be stored
        └── Overloaded              503  too many password hashes already in progress

Foreign exceptions (asyncpg, aiohttp client errors, timeouts) are translated into these
at the module that meets them: storage modules and the proxy's forwarder. One middleware
per app turns them into ``{message, code, request_id}`` JSON responses.

``code`` is an integer (the course spec types it so): the HTTP status times 100 plus a
small number that tells errors with the same status apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar


class DialogsError(Exception):
    status: ClassVar[int] = 500
    code: ClassVar[int] = 50000
    default_message: ClassVar[str] = "internal error"

    def __init__(self, message: str | None = None, **details: Any) -> None:
        self.message = message or self.default_message
        self.details = details
        super().__init__(self.message)

    def to_json(self, request_id: str) -> dict[str, Any]:
        return {"message": self.message, "code": self.code, "request_id": request_id, **self.details}

    def headers(self) -> dict[str, str]:
        return {}


class InvalidInput(DialogsError):
    status, code, default_message = 400, 40001, "invalid input"


class Unauthorized(DialogsError):
    status, code, default_message = 401, 40101, "missing or invalid bearer token"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="dialogs"'}


class TokenExpired(Unauthorized):
    code, default_message = 40102, "token expired"


class Forbidden(DialogsError):
    status, code, default_message = 403, 40301, "forbidden"


class NotFound(DialogsError):
    status, code, default_message = 404, 40401, "no such route"


class UserNotFound(NotFound):
    code, default_message = 40402, "user not found"


class ShardNotFound(NotFound):
    code, default_message = 40403, "no such shard in the shard map"


class MigrationNotFound(NotFound):
    code, default_message = 40404, "no such migration"


class MessageNotFound(NotFound):
    code, default_message = 40405, "no such message in this dialog"


class MethodNotAllowed(DialogsError):
    status, code, default_message = 405, 40501, "method not allowed"


class RequestTimeout(DialogsError):
    status, code, default_message = 408, 40801, "the request body did not arrive in time"

    def headers(self) -> dict[str, str]:
        return {"Connection": "close"}


class Conflict(DialogsError):
    status, code, default_message = 409, 40901, "conflict"


class StaleMap(Conflict):
    """A worker refused a request routed with an older shard map; ``map_version`` is the worker's."""

    code, default_message = 40902, "request routed with a stale shard map"

    def __init__(self, map_version: int, message: str | None = None) -> None:
        super().__init__(message, map_version=map_version)
        self.map_version = map_version


class RangeMoving(Conflict):
    """The range is frozen for a cutover: writes wait (the proxy buffers them) and retry."""

    code, default_message = 40903, "this dialog is moving to another shard; retry shortly"


class RangeNotServed(Conflict):
    """The shard database does not serve the range (it moved away, or is still arriving)."""

    code, default_message = 40904, "this shard does not serve this dialog"


class MapVersionConflict(Conflict):
    """A compare-and-swap on the shard-map version lost: the map changed meanwhile."""

    code, default_message = 40905, "the shard map changed meanwhile"


class BodyTooLarge(DialogsError):
    status, code, default_message = 413, 41301, "request body too large"


class IdempotencyKeyReused(DialogsError):
    status, code, default_message = 422, 42201, "Idempotency-Key was already used for a different message"


class _RetryLater:
    """Mixed into errors that tell the client when to come back (``Retry-After``, seconds)."""

    def __init__(self, message: str | None = None, retry_after: int = 1) -> None:
        super().__init__(message)  # type: ignore[call-arg]  # a mixin: the next class in the MRO is an Exception
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class TooManyRequests(_RetryLater, DialogsError):
    status, code, default_message = 429, 42901, "too many requests, retry later"


class Unavailable(_RetryLater, DialogsError):
    status, code, default_message = 503, 50301, "service unavailable, retry later"


class ShardUnavailable(Unavailable):
    code, default_message = 50302, "the shard holding this dialog is unavailable, retry later"


class MetadataUnavailable(Unavailable):
    code, default_message = 50303, "the metadata database is unavailable, retry later"


class SendOutcomeUnknown(Unavailable):
    """The shard database failed while a write was under way: it may have committed.

    Never retried on another worker (that could store it twice); the client retries with
    its Idempotency-Key and gets the stored message if there is one."""

    code, default_message = 50305, "the send may or may not have been stored; retry it with the same Idempotency-Key"


class Overloaded(Unavailable):
    code, default_message = 50304, "too many logins at once, retry shortly"


_BY_CODE: dict[int, type[DialogsError]] = {}


def _register(cls: type[DialogsError]) -> None:
    _BY_CODE[cls.code] = cls
    for sub in cls.__subclasses__():
        _register(sub)


_register(DialogsError)


def from_json(status: int, body: Mapping[str, Any]) -> DialogsError:
    """Rebuild the error a worker sent, so the proxy can re-raise it as its own."""
    cls = _BY_CODE.get(body.get("code", 0), DialogsError)
    if cls is StaleMap:
        return StaleMap(int(body["map_version"]), body.get("message"))
    if issubclass(cls, _RetryLater):
        return cls(body.get("message"), retry_after=_seconds(body.get("retry_after")))
    return cls(body.get("message"))


def _seconds(value: Any) -> int:
    """A Retry-After in whole seconds (at least 1); 1 when it is missing or not a number."""
    try:
        return max(1, int(value))
    except (TypeError, ValueError):
        return 1
