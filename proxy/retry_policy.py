"""What the proxy does after each attempt to forward a request: pure decisions, no I/O.

``proxy/forwarder.py`` makes the attempts and carries out what these functions return,
as mitmproxy's layers yield commands for the server to execute. Two levels:

- ``after_attempt``: one worker of the owning shard answered (or did not). Deliver, try
  the shard's next worker, or stop trying this shard with a refusal or a failure.
- ``after_refusal``: the shard refused the request because of where the dialog lives
  (a stale map, a range moving or not served here). Reload the shard map and route
  again, or hold the request (buffer) and retry, or give up.

Retries are only for what was certainly not applied: a connection that was never made,
a worker that could not get a database connection (503 ShardUnavailable), a refusal by
the range fence. A write that broke mid-request, at the proxy's hop or at the worker's
(503 SendOutcomeUnknown), may have been stored: without an Idempotency-Key it fails with
503; with one it is repeatable, as a read always is, and is retried here as the client
would retry it (the shard answers a replay with the stored message).
"""

from __future__ import annotations

from dataclasses import dataclass

from dialogs import errors, wire

# Route again after a map reload at most this many times per request, then buffer.
MAX_RELOADS = 4
# While buffered, retry this often even without a new map (an aborted cutover changes none).
BUFFER_RETRY_SECONDS = 0.025
# ...and this often while the shard's database is unreachable (a failover takes seconds;
# every retry costs each worker a connection attempt to every member).
FAILOVER_RETRY_SECONDS = 0.2


# --- what happened ------------------------------------------------------------------------


Reply = wire.SendResult | wire.Page | wire.ReadResult | wire.UnreadTotals  # what a worker answers with a 200


@dataclass(frozen=True, slots=True)
class Answered:
    """The worker answered with its ``reply``."""

    reply: Reply


@dataclass(frozen=True, slots=True)
class ErrorAnswer:
    """The worker answered with an error (rebuilt from its error JSON as the project's own)."""

    error: errors.DialogsError


@dataclass(frozen=True, slots=True)
class NotConnected:
    """The connection to the worker was never made: nothing was applied."""


@dataclass(frozen=True, slots=True)
class Broken:
    """The connection broke or timed out after the request was sent: it may have been applied."""


Attempt = Answered | ErrorAnswer | NotConnected | Broken


# --- what to do ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Deliver:
    reply: Reply


@dataclass(frozen=True, slots=True)
class NextWorker:
    """Try the shard's next worker; ``reason`` labels the forwarding-error metric."""

    reason: str


@dataclass(frozen=True, slots=True)
class Refused:
    """The shard will not take this request now: where it was routed (a stale map, a range
    moving: a Conflict), or its database cannot be reached by any of its workers, or failed
    during a repeatable write (an Unavailable: a primary failing over or switching over).
    See ``after_refusal``."""

    refusal: errors.Conflict | errors.Unavailable


@dataclass(frozen=True, slots=True)
class Fail:
    error: errors.DialogsError
    reason: str


Step = Deliver | NextWorker | Refused | Fail


@dataclass(frozen=True, slots=True)
class Resend:
    """Send the batch again, on a new channel: nothing of it was carried out."""


def after_channel_end(going_away: bool, written: bool, reused: bool) -> Resend | NotConnected | Broken:
    """A batch whose channel (``proxy/batcher.py``) ended before its answer came.

    ``written``: the batch was written whole (else the write failed: nothing was sent);
    ``going_away``: the worker closed the channel with GOING_AWAY, which it does only with
    every batch it read answered, dropping the rest unread (``dialog_api/channels.py``);
    ``reused``: the channel had carried batches before (else it was opened for this one).
    A batch not carried out goes again on a new channel if its channel was an idle one (a
    worker closing channels that idle, which may well take a new one), and is a
    connection never made if its channel was new (the worker is going away: the next
    worker). Any other end of a batch that was sent may have carried it out.
    """
    if written and not going_away:
        return Broken()
    return Resend() if reused else NotConnected()


_REFUSALS = (errors.StaleMap, errors.RangeMoving, errors.RangeNotServed)


def after_attempt(attempt: Attempt, repeatable: bool, workers_left: int) -> Step:
    """The next step after one attempt on one worker of the owning shard. ``repeatable``: a
    read, or a send with an Idempotency-Key, which the shard applies once however often it
    arrives (a replay answers with the stored message)."""
    if isinstance(attempt, NotConnected):
        return _next_or_fail("connect", workers_left)
    if isinstance(attempt, Broken):
        if not repeatable:
            return Fail(errors.ShardUnavailable(), "broken")
        if workers_left > 0:
            return NextWorker("broken")
        # A read or a keyed write: holding and retrying it is safe, and its words must fit both.
        return Refused(errors.ShardUnavailable("the shard's worker did not answer in time; retry shortly"))
    if isinstance(attempt, Answered):
        return Deliver(attempt.reply)
    if type(attempt.error) is errors.NotFound:
        # No such route on the worker: it speaks another wire version (a rolling upgrade
        # across one). Nothing was applied; a worker of this proxy's version may serve it.
        return _next_or_fail("wire", workers_left)
    if isinstance(attempt.error, errors.InvalidInput):
        # The proxy checks with the worker's rules first: a 400 from the worker is a bug
        # on this hop, not the client's mistake (logged by the forwarder).
        return Fail(errors.DialogsError(f"the worker refused the proxy's request: {attempt.error.message}"), "wire")
    if isinstance(attempt.error, errors.ShardUnavailable):
        # This worker could not get a database connection (nothing written); another might.
        # When none can, the shard's primary may be failing over: a refusal, held like a cutover.
        if workers_left > 0:
            return NextWorker("unavailable")
        return Refused(attempt.error)
    if isinstance(attempt.error, errors.SendOutcomeUnknown) and repeatable:
        # The shard failed during the write (a primary stopping for a switchover, or lost):
        # it may be stored, and its key makes sending it again safe. Held and retried like
        # a failover, as the client itself would retry it.
        return Refused(attempt.error)
    if isinstance(attempt.error, _REFUSALS):
        return Refused(attempt.error)
    return Fail(attempt.error, str(attempt.error.status))


def _next_or_fail(reason: str, workers_left: int, error: errors.DialogsError | None = None) -> Step:
    if workers_left > 0:
        return NextWorker(reason)
    return Fail(error or errors.ShardUnavailable(), reason)


# --- refusals: reroute, buffer or give up ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reload:
    """Reload the shard map (waiting at most ``timeout``), then route again if it moved on,
    or buffer if it did not."""

    timeout: float


@dataclass(frozen=True, slots=True)
class Buffer:
    """Hold the request: wait for the next map (at most ``seconds``), then route again."""

    seconds: float


Next = Reload | Buffer | Fail


def after_refusal(refusal: errors.Conflict | errors.Unavailable, known_version: int, reloads: int) -> Next:
    """A refusal by the shard. ``known_version``: the newest map this proxy has."""
    if isinstance(refusal, errors.Unavailable):
        return Buffer(FAILOVER_RETRY_SECONDS)  # no map would help: wait for a primary
    if isinstance(refusal, errors.StaleMap) and refusal.map_version > known_version and reloads < MAX_RELOADS:
        return Reload(timeout=2.0)
    if isinstance(refusal, errors.RangeNotServed) and reloads < MAX_RELOADS:
        # Either the map moved on and this proxy has not loaded it yet, or the range is
        # between its old and new owner for a few milliseconds: a quick look first.
        return Reload(timeout=0.5)
    return Buffer(BUFFER_RETRY_SECONDS)


def buffer_wait(
    refusal: errors.Conflict | errors.Unavailable,
    buffered_for: float | None,
    bound: float,
    buffered_now: int,
    max_buffered: int,
) -> Buffer | Fail:
    """How long to wait before the next try, or why not to wait any longer.

    ``buffered_for``: seconds this request has been held, None if it is not held yet;
    ``bound``: how long it may be held for this refusal (``wait_bound``).
    """
    failover = isinstance(refusal, errors.Unavailable)
    if buffered_for is None:
        if failover and bound <= 0:
            return Fail(refusal, "unavailable")  # holding is off: the 503 at once
        if buffered_now >= max_buffered:
            return Fail(errors.ShardUnavailable("too many requests are waiting for their shard"), "overflow")
        buffered_for = 0.0
    remaining = bound - buffered_for
    if remaining <= 0:
        if failover:
            return Fail(refusal, "unavailable")
        return Fail(errors.ShardUnavailable("this dialog is being moved between shards; retry shortly"), "timeout")
    return Buffer(min(FAILOVER_RETRY_SECONDS if failover else BUFFER_RETRY_SECONDS, remaining))


def wait_bound(refusal: errors.Conflict | errors.Unavailable, cutover_wait: float, failover_wait: float) -> float:
    """How long a request may be held for this refusal: a cutover's bound, or a failover's."""
    return failover_wait if isinstance(refusal, errors.Unavailable) else cutover_wait
