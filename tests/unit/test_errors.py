"""The error tree: distinct codes, and errors that survive the worker-to-proxy hop."""

from __future__ import annotations

from dialogs import errors


def _all(cls: type[errors.DialogsError]) -> list[type[errors.DialogsError]]:
    return [cls] + [sub for child in cls.__subclasses__() for sub in _all(child)]


def test_codes_are_unique_and_match_status() -> None:
    """Every error class has its own code, and the code starts with its HTTP status."""
    classes = _all(errors.DialogsError)
    codes = [cls.code for cls in classes]
    assert len(codes) == len(set(codes))
    for cls in classes:
        assert cls.code // 100 == cls.status


def test_errors_round_trip_through_json() -> None:
    """A worker's error body rebuilds the same error class in the proxy."""
    stale = errors.from_json(409, errors.StaleMap(7).to_json("rid"))
    assert isinstance(stale, errors.StaleMap) and stale.map_version == 7
    reused = errors.from_json(422, errors.IdempotencyKeyReused().to_json("rid"))
    assert isinstance(reused, errors.IdempotencyKeyReused)
    assert isinstance(errors.from_json(503, {"code": 50302, "message": "x"}), errors.ShardUnavailable)


def test_unavailable_carries_retry_after() -> None:
    """503s tell clients when to retry."""
    assert errors.ShardUnavailable().headers() == {"Retry-After": "1"}
