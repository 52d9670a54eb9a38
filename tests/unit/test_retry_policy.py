"""The proxy's forwarding decisions, without any server: retry only what was not applied."""

from __future__ import annotations

import pytest

from dialogs import errors, wire
from proxy import retry_policy
from proxy.retry_policy import (
    Answered,
    Broken,
    Buffer,
    Deliver,
    ErrorAnswer,
    Fail,
    NextWorker,
    NotConnected,
    Refused,
    Reload,
    after_attempt,
    after_refusal,
    buffer_wait,
)


def test_a_200_is_delivered() -> None:
    """The worker's body goes back to the client as it is."""
    page = wire.Page(b"[]", 0)
    assert after_attempt(Answered(page), is_read=True, workers_left=1) == Deliver(page)


@pytest.mark.parametrize("is_read", [True, False])
def test_a_connection_never_made_tries_the_next_worker(is_read: bool) -> None:
    """Nothing reached the worker: reads and writes both move on, and fail only when none is left."""
    assert after_attempt(NotConnected(), is_read, workers_left=1) == NextWorker("connect")
    last = after_attempt(NotConnected(), is_read, workers_left=0)
    assert isinstance(last, Fail) and isinstance(last.error, errors.ShardUnavailable)


def test_a_write_that_broke_mid_request_is_not_retried() -> None:
    """It may have been stored: 503, and the client retries with its Idempotency-Key."""
    step = after_attempt(Broken(), is_read=False, workers_left=3)
    assert isinstance(step, Fail) and isinstance(step.error, errors.ShardUnavailable)
    assert after_attempt(Broken(), is_read=True, workers_left=1) == NextWorker("broken")


def test_a_worker_without_its_database_passes_to_the_next_with_the_same_request() -> None:
    """503 from a worker: next worker; on the last, its 503 is the answer (never a 400)."""
    unavailable = errors.ShardUnavailable("database down")
    assert after_attempt(ErrorAnswer(unavailable), is_read=False, workers_left=1) == NextWorker("unavailable")
    assert after_attempt(ErrorAnswer(unavailable), is_read=False, workers_left=0) == Fail(unavailable, "unavailable")


def test_a_worker_that_failed_during_a_write_is_not_retried_elsewhere() -> None:
    """The shard failed mid-write: it may be stored, so no second worker stores it again."""
    unknown = errors.SendOutcomeUnknown()
    assert after_attempt(ErrorAnswer(unknown), is_read=False, workers_left=2) == Fail(unknown, "503")


@pytest.mark.parametrize("refusal", [errors.StaleMap(3), errors.RangeMoving(), errors.RangeNotServed()])
def test_refusals_by_the_range_fence_go_up_a_level(refusal: errors.Conflict) -> None:
    """Stale map, moving or unserved range: not the worker's fault, another worker would say the same."""
    assert after_attempt(ErrorAnswer(refusal), is_read=False, workers_left=2) == Refused(refusal)


@pytest.mark.parametrize("error", [errors.UserNotFound(), errors.IdempotencyKeyReused(), errors.DialogsError()])
def test_other_worker_errors_are_the_answer(error: errors.DialogsError) -> None:
    """A client error from the worker is passed on, not retried."""
    assert after_attempt(ErrorAnswer(error), is_read=False, workers_left=2) == Fail(error, str(error.status))


def test_a_newer_map_at_the_worker_means_reload_and_reroute() -> None:
    """The worker knows version 5, this proxy 4: reload; after MAX_RELOADS, hold instead."""
    assert after_refusal(errors.StaleMap(5), known_version=4, reloads=0) == Reload(timeout=2.0)
    assert isinstance(after_refusal(errors.StaleMap(5), 4, retry_policy.MAX_RELOADS), Buffer)
    assert isinstance(after_refusal(errors.StaleMap(4), 4, 0), Buffer)  # nothing newer to load


def test_a_moving_range_is_held_and_an_unserved_one_looked_up_first() -> None:
    """RangeMoving: buffer at once. RangeNotServed: a quick reload, then buffer."""
    assert after_refusal(errors.RangeMoving(), known_version=4, reloads=0) == Buffer(retry_policy.BUFFER_RETRY_SECONDS)
    assert after_refusal(errors.RangeNotServed(), known_version=4, reloads=0) == Reload(timeout=0.5)


def test_buffering_is_bounded_in_time_and_in_count() -> None:
    """Held at most cutover_wait seconds, at most max_buffered requests at once."""
    assert buffer_wait(None, cutover_wait=6, buffered_now=0, max_buffered=10) == Buffer(
        retry_policy.BUFFER_RETRY_SECONDS
    )
    assert buffer_wait(5.99, 6, 0, 10) == Buffer(pytest.approx(0.01))  # type: ignore[arg-type]
    too_long = buffer_wait(6.0, 6, 0, 10)
    assert isinstance(too_long, Fail) and isinstance(too_long.error, errors.ShardUnavailable)
    full = buffer_wait(None, 6, 10, 10)
    assert isinstance(full, Fail) and "too many requests" in full.error.message
    assert isinstance(buffer_wait(1.0, 6, 10, 10), Buffer)  # already held: not counted twice


def test_a_worker_of_another_wire_version_is_passed_over() -> None:
    """Its 404 for the route is not the client's 404: nothing was applied, the next worker may serve it."""
    route = errors.NotFound("no such route")
    assert after_attempt(ErrorAnswer(route), is_read=False, workers_left=1) == NextWorker("wire")
    last = after_attempt(ErrorAnswer(route), is_read=True, workers_left=0)
    assert isinstance(last, Fail) and isinstance(last.error, errors.ShardUnavailable)


def test_a_worker_refusing_the_proxys_request_is_a_bug_not_the_clients_400() -> None:
    step = after_attempt(ErrorAnswer(errors.InvalidInput("dialog_key must be ...")), is_read=False, workers_left=2)
    assert isinstance(step, Fail) and step.reason == "wire" and step.error.status == 500
    # A user that does not exist is the client's answer, as before.
    missing = errors.UserNotFound()
    assert after_attempt(ErrorAnswer(missing), is_read=False, workers_left=2) == Fail(missing, "404")
