"""Limits on login: failed attempts per client address, per (address, user) and per user,
and who may hash.

Password hashing is the proxy's one expensive operation (Argon2id: tens of milliseconds
of CPU and 64 MiB of memory each), so an unbounded burst of logins would take every core
and gigabytes of memory. Two kinds of limit, both per proxy process:

- ``FailureLimit``: after ``limit`` failed logins within ``window`` seconds for one key
  (``LoginGuard`` keeps three: see there), further attempts are refused with 429 and
  ``Retry-After`` until the oldest failure leaves the window, without hashing anything.
  An attempt counts as a failure from the moment it is let through, before its password
  is checked, and is taken back if the password was right: a burst of concurrent guesses
  gets no more through than the same guesses one after another.
- ``Passwords`` (in ``proxy/auth.py``) hashes at most ``concurrency`` passwords at once;
  the rest wait a short while, then get 503 with ``Retry-After``.

With N proxies behind a load balancer an attacker gets at most N times the limit.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable

from dialogs import errors
from proxy.clients import source_of

Clock = Callable[[], float]


class FailureLimit:
    """At most ``limit`` failures per key in any ``window`` seconds; memory bounded by ``max_keys``."""

    def __init__(self, limit: int, window: float, max_keys: int = 100_000, clock: Clock = time.monotonic) -> None:
        self._limit = limit
        self._window = window
        self._max_keys = max_keys
        self._clock = clock
        self._failures: collections.OrderedDict[str, collections.deque[float]] = collections.OrderedDict()

    def retry_after(self, key: str) -> float:
        """Seconds until ``key`` may try again; 0 if it may now."""
        failures = self._failures.get(key)
        if failures is None:
            return 0.0
        now = self._clock()
        while failures and failures[0] <= now - self._window:
            failures.popleft()
        if not failures:
            del self._failures[key]
            return 0.0
        if len(failures) < self._limit:
            return 0.0
        return failures[0] + self._window - now

    def failures(self, key: str) -> int:
        """Failures of ``key`` within the window."""
        self.retry_after(key)  # drops the ones that left the window
        return len(self._failures.get(key, ()))

    def failed(self, key: str) -> None:
        failures = self._failures.get(key)
        if failures is None:
            failures = self._failures[key] = collections.deque(maxlen=self._limit)
            if len(self._failures) > self._max_keys:
                self._failures.popitem(last=False)  # the key that failed longest ago
        else:
            self._failures.move_to_end(key)
        failures.append(self._clock())

    def succeeded(self, key: str) -> None:
        """Forget every failure of ``key`` (a right password forgives earlier typos)."""
        self._failures.pop(key, None)

    def take_back(self, key: str) -> None:
        """Forget the latest failure of ``key``: an attempt counted in advance that succeeded."""
        failures = self._failures.get(key)
        if failures:
            failures.pop()


class LoginGuard:
    """The failure limits a login passes, so that guessing stays expensive and nobody can
    lock an owner out of their own account:

    - per client address (all users): an address that guesses much gets 429;
    - per (address, user): one address gets a few tries at one account, then 429;
    - per user, all addresses together: once reached (a guess spread over many addresses),
      an address that has already failed for that user gets 429, and any other address
      still has its attempt judged, so the owner's right password gets through while each
      attacking address is down to one guess per window.
    """

    def __init__(self, per_address: FailureLimit, per_pair: FailureLimit, per_user: FailureLimit) -> None:
        self.per_address = per_address
        self.per_pair = per_pair
        self.per_user = per_user

    def attempt(self, user_key: str, address: str) -> None:
        """Let a login attempt through, counted as a failure until ``succeeded``; or raise
        TooManyRequests if a limit applies. No await between the check and the count, so
        concurrent attempts are counted one by one."""
        address = source_of(address)
        pair = _pair(user_key, address)
        wait = max(self.per_address.retry_after(address), self.per_pair.retry_after(pair))
        if self.per_pair.failures(pair):
            wait = max(wait, self.per_user.retry_after(user_key))
        if wait > 0:
            raise errors.TooManyRequests("too many failed logins; retry later", retry_after=max(1, math.ceil(wait)))
        self.per_address.failed(address)
        self.per_pair.failed(pair)
        self.per_user.failed(user_key)

    def succeeded(self, user_key: str, address: str) -> None:
        """A right password forgives this address its typos for this user; others' failures stay."""
        address = source_of(address)
        self.per_pair.succeeded(_pair(user_key, address))
        self.per_user.take_back(user_key)
        self.per_address.take_back(address)

    def not_judged(self, user_key: str, address: str) -> None:
        """The attempt ended before its password was judged (a 503): it does not count."""
        address = source_of(address)
        self.per_pair.take_back(_pair(user_key, address))
        self.per_user.take_back(user_key)
        self.per_address.take_back(address)


def _pair(user_key: str, address: str) -> str:
    return f"{address} {user_key}"
