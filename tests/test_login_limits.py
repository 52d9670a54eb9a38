"""Login under attack: failed attempts are limited, and password hashing is bounded."""

from __future__ import annotations

import asyncio

from tests.support import Cluster


async def _workers(cluster: Cluster) -> None:
    for shard_id in cluster.shard_dsns:
        await cluster.start_worker(shard_id)


async def test_failed_logins_for_one_user_are_limited(bare_cluster: Cluster) -> None:
    """Five wrong passwords in a minute: the sixth attempt, even a right one, is 429 with Retry-After."""
    await _workers(bare_cluster)
    await bare_cluster.start_proxy(DIALOGS_LOGIN_FAILURES_PER_USER="5")
    api = bare_cluster.api
    anna = await api.register("Anna")
    boris = await api.register("Boris")
    for _ in range(5):
        reply = await api.request("POST", "/login", body={"id": anna, "password": "wrong-password"})
        assert reply.status == 400 and reply.json["message"] == "wrong password"
    locked = await api.request("POST", "/login", body={"id": anna, "password": "password-1"})
    assert locked.status == 429, locked.body
    assert locked.json["code"] == 42901 and 1 <= int(locked.headers["Retry-After"]) <= 60
    assert (await api.request("POST", "/login", body={"id": boris, "password": "password-1"})).status == 200


async def test_failed_logins_from_one_address_are_limited(bare_cluster: Cluster) -> None:
    """Guessing across many users (or unknown ids) from one address hits the address limit."""
    await _workers(bare_cluster)
    await bare_cluster.start_proxy(DIALOGS_LOGIN_FAILURES_PER_ADDRESS="3")
    api = bare_cluster.api
    users = [await api.register(f"User{i}") for i in range(3)]
    statuses = [
        (await api.request("POST", "/login", body={"id": user, "password": "wrong-password"})).status
        for user in users[:2]
    ]
    statuses.append((await api.request("POST", "/login", body={"id": users[0][:-4] + "0000", "password": "x"})).status)
    assert statuses == [400, 400, 404]
    reply = await api.request("POST", "/login", body={"id": users[2], "password": "password-1"})
    assert reply.status == 429 and "Retry-After" in reply.headers


async def test_concurrent_logins_wait_for_a_turn_then_get_503(bare_cluster: Cluster) -> None:
    """One hash at a time, 50 ms of patience: a burst of 20 logins is some 400s and some 503s, never a 500."""
    await _workers(bare_cluster)
    await bare_cluster.start_proxy(
        DIALOGS_PASSWORD_CONCURRENCY="1",
        DIALOGS_PASSWORD_WAIT="0.05",
        DIALOGS_PASSWORD_TIME_COST="2",
        DIALOGS_PASSWORD_MEMORY_KIB="65536",
        DIALOGS_LOGIN_FAILURES_PER_USER="100",
        DIALOGS_LOGIN_FAILURES_PER_ADDRESS="100",
    )
    api = bare_cluster.api
    anna = await api.register("Anna")
    replies = await asyncio.gather(
        *(api.request("POST", "/login", body={"id": anna, "password": f"wrong-{i}"}) for i in range(20))
    )
    statuses = sorted(reply.status for reply in replies)
    assert set(statuses) == {400, 503}, statuses
    overloaded = next(reply for reply in replies if reply.status == 503)
    assert overloaded.json["code"] == 50304 and overloaded.headers["Retry-After"] == "1"
    # Once the burst is over, logins work again.
    assert (await api.request("POST", "/login", body={"id": anna, "password": "password-1"})).status == 200


async def test_concurrent_guesses_get_no_more_through_than_sequential_ones(bare_cluster: Cluster) -> None:
    """Twenty wrong passwords at once for one user: five are judged (400), fifteen are 429."""
    await _workers(bare_cluster)
    await bare_cluster.start_proxy(DIALOGS_LOGIN_FAILURES_PER_USER="5")
    api = bare_cluster.api
    anna = await api.register("Anna")
    replies = await asyncio.gather(
        *(api.request("POST", "/login", body={"id": anna, "password": f"guess-{i}"}) for i in range(20))
    )
    assert sorted(reply.status for reply in replies) == [400] * 5 + [429] * 15


async def test_a_stranger_cannot_lock_the_owner_out(bare_cluster: Cluster) -> None:
    """Guesses from other addresses, one address or many, leave the owner's right password
    accepted from theirs; each guessing address is refused once it failed enough."""
    await _workers(bare_cluster)
    await bare_cluster.start_proxy(
        DIALOGS_TRUSTED_PROXIES="127.0.0.1",
        DIALOGS_LOGIN_FAILURES_PER_USER="5",
        DIALOGS_LOGIN_FAILURES_PER_USER_TOTAL="10",
        DIALOGS_LOGIN_FAILURES_PER_ADDRESS="100",
    )
    api = bare_cluster.api
    anna = await api.register("Anna")

    async def login(password: str, address: str) -> int:
        reply = await api.request(
            "POST", "/login", body={"id": anna, "password": password}, headers={"X-Forwarded-For": address}
        )
        return reply.status

    assert [await login("wrong-password", "203.0.113.1") for _ in range(6)] == [400] * 5 + [429]
    assert await login("password-1", "198.51.100.7") == 200
    # Spread over many addresses, past the per-user total: each address that failed is refused,
    # the owner is not.
    assert [await login("wrong-password", f"203.0.113.{n}") for n in range(10, 16)] == [400] * 6
    assert await login("wrong-password", "203.0.113.10") == 429
    assert await login("password-1", "198.51.100.8") == 200


async def test_a_password_that_is_not_unicode_is_a_400(bare_cluster: Cluster) -> None:
    """A login whose password holds a lone surrogate (valid JSON, not valid Unicode) is refused
    like any other bad text, never a 500 from the hasher."""
    await _workers(bare_cluster)
    await bare_cluster.start_proxy()
    api = bare_cluster.api
    anna = await api.register("Anna")
    reply = await api.request("POST", "/login", raw=b'{"id": "' + anna.encode() + b'", "password": "\\ud800"}')
    assert reply.status == 400 and "password must be valid Unicode" in reply.json["message"], reply.body
    assert (await api.request("POST", "/login", body={"id": anna, "password": "password-1"})).status == 200
