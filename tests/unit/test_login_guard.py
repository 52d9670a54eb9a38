"""Failed-login limits and the client address they count against."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import make_mocked_request

from dialogs import errors
from proxy.clients import client_address, parse_networks
from proxy.login_guard import FailureLimit, LoginGuard


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_limit_refuses_after_n_failures_until_the_oldest_leaves_the_window() -> None:
    """Three failures in 60 s lock the key; it opens when the first one is 60 s old."""
    clock = Clock()
    limit = FailureLimit(3, 60, clock=clock)
    for _ in range(3):
        assert limit.retry_after("u") == 0
        limit.failed("u")
        clock.now += 10
    assert limit.retry_after("u") == pytest.approx(30)
    assert limit.retry_after("other") == 0
    clock.now += 30
    assert limit.retry_after("u") == 0


def test_success_clears_a_users_failures() -> None:
    """A correct password forgives earlier typos."""
    limit = FailureLimit(2, 60, clock=Clock())
    limit.failed("u")
    limit.failed("u")
    assert limit.retry_after("u") > 0
    limit.succeeded("u")
    assert limit.retry_after("u") == 0


def test_memory_is_bounded_by_max_keys() -> None:
    """A flood of distinct keys evicts the oldest instead of growing without end."""
    limit = FailureLimit(1, 60, max_keys=100, clock=Clock())
    for i in range(1000):
        limit.failed(f"k{i}")
    assert limit.retry_after("k999") > 0 and limit.retry_after("k0") == 0


def test_guard_raises_429_with_whole_seconds() -> None:
    """The address limit applies across users; Retry-After is at least one second."""
    clock = Clock()
    guard = _guard(per_address=2, per_pair=5, per_user=50, clock=clock)
    guard.attempt("a", "10.0.0.1")
    guard.attempt("unknown", "10.0.0.1")
    with pytest.raises(errors.TooManyRequests) as raised:
        guard.attempt("b", "10.0.0.1")
    assert raised.value.status == 429 and raised.value.headers() == {"Retry-After": "60"}
    guard.attempt("b", "10.0.0.2")


def test_attempts_count_before_they_are_judged() -> None:
    """Concurrent guesses: the sixth is refused while five are still being checked."""
    guard = _guard(per_address=100, per_pair=5, per_user=50)
    for _ in range(5):
        guard.attempt("u", "10.0.0.1")
    with pytest.raises(errors.TooManyRequests):
        guard.attempt("u", "10.0.0.1")


def test_a_right_password_or_an_outage_takes_the_attempt_back() -> None:
    """Success clears the user's failures and its own count at the address; a 503 counts nowhere."""
    guard = _guard(per_address=2, per_pair=2, per_user=50)
    guard.attempt("u", "10.0.0.1")
    guard.not_judged("u", "10.0.0.1")
    guard.attempt("u", "10.0.0.1")
    guard.succeeded("u", "10.0.0.1")
    guard.attempt("v", "10.0.0.1")
    guard.attempt("v", "10.0.0.1")  # the address holds two failures of v only
    with pytest.raises(errors.TooManyRequests):
        guard.attempt("w", "10.0.0.1")


def _guard(per_address: int, per_pair: int, per_user: int, clock: Clock | None = None) -> LoginGuard:
    clock = clock or Clock()
    return LoginGuard(
        per_address=FailureLimit(per_address, 60, clock=clock),
        per_pair=FailureLimit(per_pair, 60, clock=clock),
        per_user=FailureLimit(per_user, 60, clock=clock),
    )


def test_guesses_from_one_address_do_not_lock_the_owner_out() -> None:
    """Five wrong passwords for a user from one address: that address gets 429, the owner
    elsewhere still has a login judged."""
    guard = _guard(per_address=20, per_pair=5, per_user=50)
    for _ in range(5):
        guard.attempt("owner", "10.0.0.66")
    with pytest.raises(errors.TooManyRequests):
        guard.attempt("owner", "10.0.0.66")
    guard.attempt("owner", "192.0.2.7")
    guard.succeeded("owner", "192.0.2.7")


def test_a_guess_spread_over_many_addresses_leaves_each_one_guess() -> None:
    """Past the per-user total, an address that already failed for the user is refused; a new
    address (the owner's) is still judged, once."""
    guard = _guard(per_address=20, per_pair=5, per_user=10)
    for n in range(5):
        guard.attempt("owner", f"10.0.0.{n}")
        guard.attempt("owner", f"10.0.0.{n}")
    with pytest.raises(errors.TooManyRequests):
        guard.attempt("owner", "10.0.0.1")  # failed before: down to nothing for the window
    guard.attempt("owner", "192.0.2.7")  # the owner, from elsewhere: judged
    guard.succeeded("owner", "192.0.2.7")
    guard.attempt("owner", "10.0.0.99")  # a fresh attacking address: one guess...
    with pytest.raises(errors.TooManyRequests):
        guard.attempt("owner", "10.0.0.99")  # ...and no second


class _Transport:
    """Just enough of a transport to say who the peer is."""

    def __init__(self, peer: str) -> None:
        self.peer = peer

    def get_extra_info(self, name: str, default: object = None) -> object:
        return (self.peer, 1234) if name == "peername" else default


@pytest.mark.parametrize(
    ("peer", "forwarded", "trusted", "expected"),
    [
        ("203.0.113.5", None, "", "203.0.113.5"),
        ("203.0.113.5", "1.2.3.4", "", "203.0.113.5"),  # nobody trusted: the header is ignored
        ("10.1.2.3", "1.2.3.4", "10.0.0.0/8", "1.2.3.4"),
        ("10.1.2.3", "spoofed, 1.2.3.4", "10.0.0.0/8", "1.2.3.4"),  # the balancer appends the real one
        ("10.1.2.3", "1.2.3.4, 10.9.9.9", "10.0.0.0/8", "1.2.3.4"),
        ("203.0.113.5", "1.2.3.4", "10.0.0.0/8", "203.0.113.5"),  # not from the balancer
    ],
)
def test_client_address(peer: str, forwarded: str | None, trusted: str, expected: str) -> None:
    """X-Forwarded-For counts only when the peer is a trusted balancer, and only its last untrusted hop."""
    headers = {"X-Forwarded-For": forwarded} if forwarded else {}
    request = make_mocked_request("POST", "/login", headers=headers, transport=_Transport(peer))
    assert client_address(request, parse_networks(trusted)) == expected


def test_an_ipv6_network_counts_as_one_address() -> None:
    """Guesses from many addresses of one IPv6 /64 count together; another /64 is another source."""
    guard = _guard(per_address=3, per_pair=100, per_user=100)
    for n in range(3):
        guard.attempt(f"u{n}", f"2001:db8:1:2::{n + 1}")
    with pytest.raises(errors.TooManyRequests):
        guard.attempt("u9", "2001:db8:1:2:ffff::9")
    guard.attempt("u9", "2001:db8:1:3::1")
