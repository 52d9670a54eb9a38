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
    wait_bound,
)


def test_a_200_is_delivered() -> None:
    """The worker's body goes back to the client as it is."""
    page = wire.Page(b"[]", 0)
    assert after_attempt(Answered(page), repeatable=True, workers_left=1) == Deliver(page)


@pytest.mark.parametrize("repeatable", [True, False])
def test_a_connection_never_made_tries_the_next_worker(repeatable: bool) -> None:
    """Nothing reached the worker: reads and writes both move on, and fail only when none is left."""
    assert after_attempt(NotConnected(), repeatable, workers_left=1) == NextWorker("connect")
    last = after_attempt(NotConnected(), repeatable, workers_left=0)
    assert isinstance(last, Fail) and isinstance(last.error, errors.ShardUnavailable)


def test_a_write_that_broke_mid_request_is_not_retried() -> None:
    """It may have been stored: 503, and the client retries with its Idempotency-Key."""
    step = after_attempt(Broken(), repeatable=False, workers_left=3)
    assert isinstance(step, Fail) and isinstance(step.error, errors.ShardUnavailable)
    assert after_attempt(Broken(), repeatable=True, workers_left=1) == NextWorker("broken")


def test_a_worker_without_its_database_passes_to_the_next_with_the_same_request() -> None:
    """503 from a worker: next worker; when none reaches the database, the shard refuses
    (its primary may be failing over: see the buffering below), never a 400."""
    unavailable = errors.ShardUnavailable("database down")
    assert after_attempt(ErrorAnswer(unavailable), repeatable=False, workers_left=1) == NextWorker("unavailable")
    assert after_attempt(ErrorAnswer(unavailable), repeatable=False, workers_left=0) == Refused(unavailable)
    assert after_refusal(unavailable, known_version=4, reloads=0) == Buffer(retry_policy.FAILOVER_RETRY_SECONDS)


def test_a_failover_is_waited_for_within_its_own_bound_then_its_503_is_the_answer() -> None:
    unavailable = errors.ShardUnavailable("database down")
    assert wait_bound(unavailable, cutover_wait=6, failover_wait=20) == 20
    assert wait_bound(errors.RangeMoving(), cutover_wait=6, failover_wait=20) == 6
    assert buffer_wait(unavailable, None, 20, 0, 10) == Buffer(retry_policy.FAILOVER_RETRY_SECONDS)
    assert buffer_wait(unavailable, 19.95, 20, 0, 10) == Buffer(pytest.approx(0.05))  # type: ignore[arg-type]
    assert buffer_wait(unavailable, 20.0, 20, 0, 10) == Fail(unavailable, "unavailable")
    # Shards of one server (failover_wait 0): the 503 at once, as before there were replicas.
    assert buffer_wait(unavailable, None, 0, 0, 10) == Fail(unavailable, "unavailable")


def test_a_worker_that_failed_during_a_write_is_not_retried_elsewhere() -> None:
    """The shard failed mid-write: it may be stored, so no second worker stores it again."""
    unknown = errors.SendOutcomeUnknown()
    assert after_attempt(ErrorAnswer(unknown), repeatable=False, workers_left=2) == Fail(unknown, "503")


def test_a_write_with_an_idempotency_key_is_retried_as_its_client_would() -> None:
    """Stored or not, sending it again with its key stores it once: held like a failover
    (retried until the failover bound), and without holding its 503 is the answer."""
    unknown = errors.SendOutcomeUnknown()
    assert after_attempt(ErrorAnswer(unknown), repeatable=True, workers_left=2) == Refused(unknown)
    assert after_refusal(unknown, known_version=1, reloads=0) == Buffer(retry_policy.FAILOVER_RETRY_SECONDS)
    assert buffer_wait(unknown, None, bound=0, buffered_now=0, max_buffered=10) == Fail(unknown, "unavailable")
    assert wait_bound(unknown, cutover_wait=6, failover_wait=30) == 30
    broken = after_attempt(Broken(), repeatable=True, workers_left=0)
    # Its words fit a list as well as a send: a list never "may have been stored".
    assert isinstance(broken, Refused) and type(broken.refusal) is errors.ShardUnavailable
    assert "stored" not in broken.refusal.message


@pytest.mark.parametrize("refusal", [errors.StaleMap(3), errors.RangeMoving(), errors.RangeNotServed()])
def test_refusals_by_the_range_fence_go_up_a_level(refusal: errors.Conflict) -> None:
    """Stale map, moving or unserved range: not the worker's fault, another worker would say the same."""
    assert after_attempt(ErrorAnswer(refusal), repeatable=False, workers_left=2) == Refused(refusal)


@pytest.mark.parametrize("error", [errors.UserNotFound(), errors.IdempotencyKeyReused(), errors.DialogsError()])
def test_other_worker_errors_are_the_answer(error: errors.DialogsError) -> None:
    """A client error from the worker is passed on, not retried."""
    assert after_attempt(ErrorAnswer(error), repeatable=False, workers_left=2) == Fail(error, str(error.status))


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
    moving = errors.RangeMoving()
    assert buffer_wait(moving, None, bound=6, buffered_now=0, max_buffered=10) == Buffer(
        retry_policy.BUFFER_RETRY_SECONDS
    )
    assert buffer_wait(moving, 5.99, 6, 0, 10) == Buffer(pytest.approx(0.01))  # type: ignore[arg-type]
    too_long = buffer_wait(moving, 6.0, 6, 0, 10)
    assert isinstance(too_long, Fail) and isinstance(too_long.error, errors.ShardUnavailable)
    full = buffer_wait(moving, None, 6, 10, 10)
    assert isinstance(full, Fail) and "too many requests" in full.error.message
    assert isinstance(buffer_wait(moving, 1.0, 6, 10, 10), Buffer)  # already held: not counted twice


def test_a_worker_of_another_wire_version_is_passed_over() -> None:
    """Its 404 for the route is not the client's 404: nothing was applied, the next worker may serve it."""
    route = errors.NotFound("no such route")
    assert after_attempt(ErrorAnswer(route), repeatable=False, workers_left=1) == NextWorker("wire")
    last = after_attempt(ErrorAnswer(route), repeatable=True, workers_left=0)
    assert isinstance(last, Fail) and isinstance(last.error, errors.ShardUnavailable)


def test_a_worker_refusing_the_proxys_request_is_a_bug_not_the_clients_400() -> None:
    step = after_attempt(ErrorAnswer(errors.InvalidInput("dialog_key must be ...")), repeatable=False, workers_left=2)
    assert isinstance(step, Fail) and step.reason == "wire" and step.error.status == 500
    # A user that does not exist is the client's answer, as before.
    missing = errors.UserNotFound()
    assert after_attempt(ErrorAnswer(missing), repeatable=False, workers_left=2) == Fail(missing, "404")


@pytest.mark.parametrize(
    ("going_away", "written", "reused", "step"),
    [
        # The worker closed the channel with every batch it read answered: not carried out.
        (True, True, True, retry_policy.Resend()),  # an idle channel it closed: a new one
        (True, True, False, NotConnected()),  # a new channel closed at once: the worker is going
        # The write failed: nothing was sent.
        (False, False, True, retry_policy.Resend()),
        (False, False, False, NotConnected()),
        # Any other end after the batch was written: it may have been carried out.
        (False, True, True, Broken()),
        (False, True, False, Broken()),
    ],
)
def test_a_batch_goes_again_only_when_its_channel_ended_without_it(
    going_away: bool, written: bool, reused: bool, step: object
) -> None:
    assert retry_policy.after_channel_end(going_away, written, reused) == step
    if isinstance(step, Broken):  # and an unkeyed send that may be stored is not sent twice
        assert isinstance(after_attempt(step, repeatable=False, workers_left=1), Fail)
