"""Bad input gets a clear 4xx with a JSON body, never a 500, and stores nothing."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable

import jwt
import pytest

from tests.support import ADMIN_TOKEN, JWT_SECRET, Cluster, raw_http


@pytest.fixture
async def pair(cluster: Cluster) -> tuple[str, str, str]:
    """Anna's id and token, and Boris's id."""
    anna, token = await cluster.api.user("Anna")
    boris = await cluster.api.register("Boris")
    return anna, token, boris


def _assert_error(reply, status: int, fragment: str) -> None:  # type: ignore[no-untyped-def]
    assert reply.status == status, reply.body
    body = reply.json
    assert fragment in body["message"]
    assert body["request_id"] == reply.headers["X-Request-ID"]
    assert isinstance(body["code"], int) and body["code"] // 100 == status


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b"{not json", "not valid JSON"),
        (b"", "must be JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"txt": "hello"}', "text is required"),
        (b'{"text": ""}', "text must not be empty"),
        (b'{"text": "   "}', "text must not be empty"),
        (b'{"text": 42}', "text must be a string"),
        (b'{"text": "a\\u0000b"}', "NUL"),
        (b'{"text": "\\ud800"}', "valid Unicode"),
    ],
)
async def test_send_rejects_bad_bodies(cluster: Cluster, pair: tuple[str, str, str], raw: bytes, fragment: str) -> None:
    """Malformed JSON, missing, empty or unstorable text: 400 with a message."""
    anna, token, boris = pair
    reply = await cluster.api.request("POST", f"/dialog/{boris}/send", token=token, raw=raw)
    _assert_error(reply, 400, fragment)
    assert (await cluster.api.list(token, boris)).json == []


async def test_text_length_limit(cluster: Cluster, pair: tuple[str, str, str]) -> None:
    """4,096 characters are accepted (multibyte too); 4,097 are a 400."""
    anna, token, boris = pair
    assert (await cluster.api.send(token, boris, "я" * 4096)).status == 200
    _assert_error(await cluster.api.send(token, boris, "я" * 4097), 400, "at most 4096 characters")


async def test_oversized_body_is_413(cluster: Cluster, pair: tuple[str, str, str]) -> None:
    """A body past the proxy's limit (64 KiB) is refused before it is parsed."""
    anna, token, boris = pair
    reply = await cluster.api.request("POST", f"/dialog/{boris}/send", token=token, body={"text": "x" * 70_000})
    _assert_error(reply, 413, "too large")


@pytest.mark.parametrize("bad_id", ["not-a-uuid", "123", "e4d2e6b0-cde2-42c5-aac3-0b8316f21e5"])
async def test_bad_user_ids_are_400(cluster: Cluster, pair: tuple[str, str, str], bad_id: str) -> None:
    """A user_id that is not a UUID is a 400 on send, list and profile."""
    anna, token, boris = pair
    _assert_error(await cluster.api.send(token, bad_id, "hi"), 400, "user_id must be a UUID")
    _assert_error(await cluster.api.list(token, bad_id), 400, "user_id must be a UUID")
    _assert_error(await cluster.api.request("GET", f"/user/get/{bad_id}"), 400, "id must be a UUID")


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"limit": "0"}, "limit must be an integer from 1 to 1000"),
        ({"limit": "1001"}, "limit must be an integer from 1 to 1000"),
        ({"limit": "ten"}, "limit must be an integer"),
        ({"before": "abc"}, "before must be an integer"),
        ({"before": "-5"}, "before must be an integer"),
        ({"before": str(2**63)}, "before must be an integer"),
    ],
)
async def test_bad_paging_parameters(
    cluster: Cluster, pair: tuple[str, str, str], params: dict[str, str], fragment: str
) -> None:
    """limit outside 1..1000 and a non-id before are 400s."""
    anna, token, boris = pair
    reply = await cluster.api.request("GET", f"/dialog/{boris}/list", token=token, params=params)
    _assert_error(reply, 400, fragment)


def _token(claims: dict[str, object], secret: str = JWT_SECRET) -> str:
    return jwt.encode(claims, secret, algorithm="HS256")


def _signed(claims: dict[str, object], secret: str = JWT_SECRET, expires_in: int | None = 60) -> Callable[[], str]:
    """A header built when the test runs, so that ``exp`` is relative to then."""

    def build() -> str:
        full = dict(claims)
        if expires_in is not None:
            full["exp"] = int(time.time()) + expires_in
        return "Bearer " + _token(full, secret)

    return build


@pytest.mark.parametrize(
    ("authorization", "fragment"),
    [
        (None, "missing bearer token"),
        ("Basic dXNlcjpwYXNz", "must use the Bearer scheme: `Authorization: Bearer <token>`"),
        ("Bearer ", "the bearer token is empty"),
        ("Bearer not.a.jwt", "invalid bearer token"),
        (_signed({"sub": str(uuid.uuid4())}, "another-secret" * 3), "invalid bearer token"),
        (_signed({"sub": str(uuid.uuid4())}, expires_in=-60), "token expired"),
        (_signed({"sub": str(uuid.uuid4())}, expires_in=None), "invalid bearer token"),
        (_signed({"sub": "admin"}), "does not name a user"),
    ],
)
async def test_bad_tokens_are_401_before_any_other_check(
    cluster: Cluster, authorization: str | Callable[[], str] | None, fragment: str
) -> None:
    """Missing, malformed, tampered, expired or exp-less tokens: 401, even with bad input too."""
    if callable(authorization):
        authorization = authorization()
    headers = {"Authorization": authorization} if authorization else None
    for method, path, raw in [
        ("POST", "/dialog/not-a-uuid/send", b"{broken"),
        ("GET", "/dialog/not-a-uuid/list?limit=0", None),
    ]:
        reply = await cluster.api.request(method, path, raw=raw, headers=headers, validate=False)
        _assert_error(reply, 401, fragment)
        assert reply.headers["WWW-Authenticate"].startswith("Bearer")


async def test_tampered_token_is_401(cluster: Cluster, pair: tuple[str, str, str]) -> None:
    """Changing the payload of a valid token breaks its signature."""
    anna, token, boris = pair
    header, payload, signature = token.split(".")
    forged = ".".join([header, payload[:-2] + ("AA" if payload[-2:] != "AA" else "BB"), signature])
    _assert_error(await cluster.api.list(forged, boris), 401, "invalid bearer token")


async def test_monolith_token_with_user_id_claim_works(cluster: Cluster, pair: tuple[str, str, str]) -> None:
    """A token signed with the shared secret that names its user in user_id (no sub) is accepted."""
    anna, token, boris = pair
    monolith = _token({"user_id": anna, "exp": int(time.time()) + 60})
    assert (await cluster.api.send(monolith, boris, "from the monolith")).status == 200
    assert (await cluster.api.list(token, boris)).json[0]["text"] == "from the monolith"


async def test_unknown_user_is_404_for_send_and_list(cluster: Cluster, pair: tuple[str, str, str]) -> None:
    """One rule for both: a user that does not exist is a 404 (code 40402), to send to or
    to list with; nothing is stored. A known user never written to is an empty list."""
    anna, token, boris = pair
    nobody = str(uuid.uuid4())
    sent = await cluster.api.send(token, nobody, "hello?")
    _assert_error(sent, 404, "user not found")
    listed = await cluster.api.list(token, nobody)
    _assert_error(listed, 404, "user not found")
    assert sent.json["code"] == listed.json["code"] == 40402
    assert (await cluster.api.list(token, boris)).json == []


async def test_idempotency_key_reused_for_other_text_is_422(cluster: Cluster, pair: tuple[str, str, str]) -> None:
    """One key, two different messages: the second is refused and the first is kept."""
    anna, token, boris = pair
    assert (await cluster.api.send(token, boris, "first", key="k-1")).status == 200
    _assert_error(await cluster.api.send(token, boris, "second", key="k-1"), 422, "Idempotency-Key")
    assert [m["text"] for m in (await cluster.api.list(token, boris)).json] == ["first"]


@pytest.mark.parametrize("key", ["", "x" * 256, "ключ", "tab\there"])
async def test_bad_idempotency_keys_are_400(cluster: Cluster, pair: tuple[str, str, str], key: str) -> None:
    """Idempotency-Key must be 1 to 255 printable ASCII characters."""
    anna, token, boris = pair
    reply = await cluster.api.request(
        "POST",
        f"/dialog/{boris}/send",
        token=token,
        body={"text": "hi"},
        headers={"Idempotency-Key": key.encode().decode("latin-1")},
    )
    _assert_error(reply, 400, "Idempotency-Key")


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"second_name": "T", "password": "password-1"}, "first_name is required"),
        ({"first_name": "A", "last_name": "T", "password": "password-1"}, "second_name is required (the spec's name"),
        ({"first_name": "A", "second_name": 5, "password": "password-1"}, "second_name must be a string"),
        ({"first_name": "A", "second_name": "T", "password": "short"}, "at least 8 characters"),
        ({"first_name": "A", "second_name": "T", "password": "password-1", "birthdate": "17.05.1990"}, "birthdate"),
        ({"first_name": "A", "second_name": "T", "password": "password-1", "birthdate": "2999-01-01"}, "future"),
        ({"first_name": "A" * 101, "second_name": "T", "password": "password-1"}, "at most 100"),
    ],
)
async def test_registration_validation(cluster: Cluster, body: dict[str, str], fragment: str) -> None:
    """Registration checks names, password length and birthdate."""
    _assert_error(await cluster.api.request("POST", "/user/register", body=body), 400, fragment)


async def test_login_failures(cluster: Cluster, pair: tuple[str, str, str]) -> None:
    """Unknown user: 404 (as the spec says); wrong password: 400; malformed body: 400."""
    anna, token, boris = pair
    _assert_error(
        await cluster.api.request("POST", "/login", body={"id": str(uuid.uuid4()), "password": "password-1"}),
        404,
        "user not found",
    )
    _assert_error(
        await cluster.api.request("POST", "/login", body={"id": anna, "password": "wrong-password"}),
        400,
        "wrong password",
    )
    _assert_error(await cluster.api.request("POST", "/login", body={"id": 5, "password": "x"}), 400, "id must be")
    _assert_error(await cluster.api.request("POST", "/login", body={"password": "x"}), 400, "id is required")
    _assert_error(await cluster.api.request("POST", "/login", body={"id": anna}), 400, "password is required")


async def test_unknown_route_and_user(cluster: Cluster) -> None:
    """Unknown routes and unknown users are JSON 404s; a known route with another method is a 405."""
    route = await cluster.api.request("GET", "/nowhere", validate=False)
    _assert_error(route, 404, "no such route")
    method = await cluster.api.request("DELETE", "/login", validate=False)
    _assert_error(method, 405, "method not allowed")
    assert method.headers["Allow"] == "POST"
    user = await cluster.api.request("GET", f"/user/get/{uuid.uuid4()}")
    _assert_error(user, 404, "user not found")
    # One status, two errors: the code tells them apart.
    assert (route.json["code"], user.json["code"]) == (40401, 40402)


async def test_request_id_is_echoed(cluster: Cluster) -> None:
    """A client's X-Request-ID comes back; without one the proxy makes one up."""
    reply = await cluster.api.request("GET", "/health", headers={"X-Request-ID": "trace-123"})
    assert reply.headers["X-Request-ID"] == "trace-123"
    assert len((await cluster.api.request("GET", "/health")).headers["X-Request-ID"]) == 32


_DEEP = b"[" * 30_000 + b"]" * 30_000


@pytest.mark.parametrize("path", ["/login", "/user/register", "/dialog/{boris}/send", "/admin/shards"])
async def test_deeply_nested_json_is_400(cluster: Cluster, pair: tuple[str, str, str], path: str) -> None:
    """JSON nested 30,000 levels deep (60 KB) is a 400, not a RecursionError."""
    anna, token, boris = pair
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN if path.startswith('/admin') else token}"}
    reply = await cluster.api.request("POST", path.format(boris=boris), raw=_DEEP, headers=headers)
    _assert_error(reply, 400, "nested too deeply")


@pytest.mark.parametrize("path", ["/dialog/{boris}/list", "/dialog/{boris}/send", "/admin/shards"])
async def test_authorization_header_that_is_not_utf8_is_401(
    cluster: Cluster, pair: tuple[str, str, str], path: str
) -> None:
    """Header bytes that are not UTF-8 in the token: 401 with a JSON body, on user and admin routes."""
    anna, token, boris = pair
    method = b"POST" if path.endswith("send") else b"GET"
    head = b"%s %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: Bearer \xff\xfe%s" % (
        method,
        path.format(boris=boris).encode(),
        token.encode()[:20],
    )
    status, body = await raw_http(cluster.proxy_urls[0], head, b'{"text": "hi"}')
    assert status == 401, body
    assert json.loads(body)["message"] == "malformed bearer token"


@pytest.mark.parametrize("migration_id", ["9223372036854775808", "0", "-1", "1e3", "9" * 5000])
async def test_migration_id_out_of_range_is_400(cluster: Cluster, migration_id: str) -> None:
    """A migration id that is no int64 (or not positive) is a 400, never an overflow 500."""
    reply = await cluster.admin("GET", f"/admin/migrations/{migration_id}")
    _assert_error(reply, 400, "migration_id must be an integer")


async def test_unknown_methods_do_not_grow_the_metrics(cluster: Cluster) -> None:
    """WebDAV and other methods the HTTP parser knows but no route serves are counted as
    OTHER: metric label values stay bounded whatever clients send."""
    for method in (b"PROPFIND", b"MKCOL", b"UNLOCK"):
        status, _ = await raw_http(cluster.proxy_urls[0], method + b" /health HTTP/1.1\r\nHost: x")
        assert status == 405, status
    reply = await cluster.api.request("GET", "/metrics", validate=False)
    text = reply.body.decode()
    assert 'method="OTHER"' in text
    assert not any(name in text for name in ("PROPFIND", "MKCOL", "UNLOCK"))
