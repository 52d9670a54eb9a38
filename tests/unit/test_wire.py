"""The proxy-worker wire: each message survives its own encoding, and a worker refuses what
the public API would refuse."""

from __future__ import annotations

import uuid
from urllib.parse import parse_qsl

import orjson
import pytest

from dialogs import checks, errors, wire
from dialogs.keys import INT64_MAX, dialog_key, user_key
from proxy import validation

ANNA, BORIS = uuid.UUID(int=1), uuid.UUID(int=2)
KEY = dialog_key(ANNA, BORIS)


def _item(**changes: object) -> dict[str, object]:
    item = wire.SendItem(KEY, ANNA, BORIS, "hello", "key-1", 7, "req-1").to_json()
    return {**item, **changes}


def _through_json(value: object) -> object:
    return orjson.loads(orjson.dumps(value))


def test_a_send_item_round_trips() -> None:
    item = wire.SendItem(KEY, BORIS, ANNA, "héllo ✓", None, 2**40, "r" * wire.MAX_REQUEST_ID_LENGTH)
    assert wire.SendItem.from_json(_through_json(item.to_json())) == item


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"text": "   "}, "text must not be empty"),
        ({"text": "a\x00b"}, "NUL"),
        ({"text": "x" * (wire.MAX_TEXT_LENGTH + 1)}, "at most"),
        ({"text": 5}, "text must be a string"),
        ({"idempotency_key": "ключ"}, "idempotency_key must be 1 to 255 printable ASCII"),
        ({"idempotency_key": ""}, "idempotency_key"),
        ({"map_version": True}, "map_version must be an integer"),
        ({"map_version": "7"}, "map_version must be an integer"),  # JSON numbers only, unlike a query
        ({"map_version": None}, "map_version"),
        ({"dialog_key": str(INT64_MAX + 1)}, "dialog_key"),
        ({"dialog_key": KEY + 1}, "dialog_key must be the dialog key of from and to"),
        ({"from": "not-a-uuid"}, "from must be a UUID"),
        ({"to": None}, "to must be a UUID"),
    ],
)
def test_a_worker_checks_a_send_item(changes: dict[str, object], message: str) -> None:
    with pytest.raises(errors.InvalidInput, match=message):
        wire.SendItem.from_json(_item(**changes))


@pytest.mark.parametrize("text", ["", " \t ", "a\x00b", "x" * 5000, "\ud800", 17, None])
def test_a_text_is_refused_by_the_worker_with_the_words_of_the_public_api(text: object) -> None:
    """One rule, one sentence: what the proxy says of a text (at the wire's ceiling), the worker says."""
    with pytest.raises(errors.InvalidInput) as public:
        validation.send_text({"text": text}, 4096 if text == "x" * 5000 else wire.MAX_TEXT_LENGTH)
    if text == "x" * 5000:  # within the wire's ceiling, only the proxies' own setting refuses it
        assert wire.SendItem.from_json(_item(text=text)).text == text
        return
    with pytest.raises(errors.InvalidInput) as worker:
        wire.SendItem.from_json(_item(text=text))
    assert worker.value.message == public.value.message


@pytest.mark.parametrize("key", ["", "x" * 256, "ключ", "a\nb", 5])
def test_an_idempotency_key_is_refused_by_both_with_one_rule(key: object) -> None:
    with pytest.raises(errors.InvalidInput, match="1 to 255 printable ASCII"):
        checks.idempotency_key(key)
    with pytest.raises(errors.InvalidInput, match="idempotency_key must be 1 to 255 printable ASCII"):
        wire.SendItem.from_json(_item(idempotency_key=key))


def test_a_message_is_encoded_only_once_routed() -> None:
    """The proxy builds it before routing (map_version None); encoding it then is a bug, caught."""
    with pytest.raises(ValueError, match="routed"):
        wire.SendItem(KEY, ANNA, BORIS, "hi", None, None, "r").to_json()
    with pytest.raises(ValueError, match="routed"):
        wire.ListQuery(KEY, ANNA, BORIS, INT64_MAX, 10, None, "r").to_query()


def test_a_request_id_the_wire_cannot_keep_is_dropped() -> None:
    """Too long or unprintable: the worker names the send by the batch's own id instead."""
    assert wire.SendItem.from_json(_item(request_id="x" * 129)).request_id == ""
    assert wire.SendItem.from_json(_item(request_id="a\nb")).request_id == ""
    assert wire.SendItem.from_json(_item(request_id=None)).request_id == ""


def test_a_list_query_round_trips() -> None:
    query = wire.ListQuery(
        KEY, BORIS, ANNA, before=12345, limit=wire.MAX_LIST_LIMIT, map_version=3, request_id="r&x=1 ü+%"
    )
    assert wire.ListQuery.from_query(dict(parse_qsl(query.to_query()))) == query


def test_a_list_query_round_trips_in_a_batch_with_the_same_bounds() -> None:
    query = wire.ListQuery(KEY, BORIS, ANNA, before=12345, limit=wire.MAX_LIST_LIMIT, map_version=3, request_id="r")
    assert wire.ListQuery.from_json(_through_json(query.to_json())) == query
    raw = query.to_json()
    bad = [("limit", 0), ("limit", wire.MAX_LIST_LIMIT + 1), ("before", 0), ("limit", "5"), ("before", None)]
    for name, value in bad:
        with pytest.raises(errors.InvalidInput, match=f"{name} must be an integer from"):
            wire.ListQuery.from_json({**raw, name: value})
    with pytest.raises(errors.InvalidInput, match="dialog key of viewer and other"):
        wire.ListQuery.from_json({**raw, "other": str(uuid.UUID(int=3))})
    with pytest.raises(errors.InvalidInput, match="JSON object"):
        wire.ListQuery.from_json([raw])


def test_a_batch_of_pages_carries_each_page_untouched_and_each_error_whole() -> None:
    pages = [wire.Page(b'[{"id":"2","text":"\\n"}]', 1), wire.Page(b"[]", 0), wire.Page(b'[{"id":"1"}]', 1)]
    error = errors.StaleMap(9)
    body = wire.encode_pages([pages[0], wire.error_json(error, "r1"), pages[1], pages[2]])
    first, refused, *rest = wire.decode_pages(body, 4)
    assert [first, *rest] == pages
    assert isinstance(refused, errors.StaleMap) and refused.to_json("r1") == error.to_json("r1")


@pytest.mark.parametrize(
    "body",
    [b"", b"[]", b'[{"status":200,"count":1,"length":5}]\n[]', b'[{"status":200,"count":0,"length":2}]\n[]]',
     b'[{"count":0,"length":2}]\n[]', b'[{"status":200,"count":0}]\n[]', b'{"status":200}\n', b"not json\n"],
)  # fmt: skip
def test_a_malformed_batch_of_pages_is_broken_not_misread(body: bytes) -> None:
    with pytest.raises(ValueError):
        wire.decode_pages(body, 1)


def test_a_list_query_has_the_public_bounds() -> None:
    query = dict(parse_qsl(wire.ListQuery(KEY, ANNA, BORIS, INT64_MAX, 1, 3, "r").to_query()))
    for name, value in [("limit", "0"), ("limit", str(wire.MAX_LIST_LIMIT + 1)), ("before", "0")]:
        with pytest.raises(errors.InvalidInput, match=f"{name} must be an integer from 1 to"):
            wire.ListQuery.from_query({**query, name: value})
    with pytest.raises(errors.InvalidInput, match="map_version"):
        wire.ListQuery.from_query({k: v for k, v in query.items() if k != "map_version"})
    with pytest.raises(errors.InvalidInput, match="dialog key of viewer and other"):
        wire.ListQuery.from_query({**query, "other": str(uuid.UUID(int=3))})
    defaults = wire.ListQuery.from_query({k: v for k, v in query.items() if k not in ("limit", "before")})
    assert (defaults.limit, defaults.before) == (wire.DEFAULT_LIST_LIMIT, INT64_MAX)


def test_a_send_result_round_trips() -> None:
    result = wire.SendResult(2**62, "2026-12-02T10:00:00.123456+00:00", duplicate=True)
    assert wire.send_answer_from_json(_through_json(result.to_json())) == result


@pytest.mark.parametrize(
    "error",
    [
        errors.StaleMap(9),
        errors.RangeMoving(),
        errors.IdempotencyKeyReused(),
        errors.ShardUnavailable("db down", retry_after=7),
        errors.SendOutcomeUnknown(),
        errors.InvalidInput("text must not be empty"),
    ],
)
def test_an_error_crosses_the_hop_whole(error: errors.DialogsError) -> None:
    """Its class, message, request id, and what it tells the client: Retry-After, the map version."""
    data = _through_json(wire.error_json(error, "req-9"))
    assert isinstance(data, dict) and data["request_id"] == "req-9"
    rebuilt = wire.send_answer_from_json(data)
    assert type(rebuilt) is type(error) and isinstance(rebuilt, errors.DialogsError)
    assert rebuilt.message == error.message and rebuilt.headers() == error.headers()
    assert getattr(rebuilt, "map_version", None) == getattr(error, "map_version", None)


def test_an_error_response_keeps_its_retry_after_header() -> None:
    body = orjson.dumps(errors.ShardUnavailable().to_json("r"))
    rebuilt = wire.error_from_response(503, body, "4")
    assert isinstance(rebuilt, errors.ShardUnavailable) and rebuilt.headers() == {"Retry-After": "4"}


@pytest.mark.parametrize(("status", "expected"), [(502, errors.ShardUnavailable), (400, errors.DialogsError)])
def test_an_error_response_that_is_not_ours(status: int, expected: type[errors.DialogsError]) -> None:
    """A hop in between answered (HTML, nothing): a server error is a 503, anything else a bug."""
    assert type(wire.error_from_response(status, b"<html>bad gateway</html>", None)) is expected


@pytest.mark.parametrize(
    "answer",
    [
        [],
        "ok",
        {"status": 200, "id": "1"},
        {"id": "1"},
        {"status": "200"},
        {"status": 409, "code": 40902, "message": "stale"},  # a stale map without its version
        {"status": 400, "code": [1]},
    ],
)
def test_a_malformed_batch_answer_is_not_taken_for_a_result(answer: object) -> None:
    with pytest.raises(ValueError):
        wire.send_answer_from_json(answer)


def test_a_page_knows_its_size_from_the_worker() -> None:
    assert wire.Page.from_response(b"[]", "0").empty
    assert not wire.Page.from_response(b'[{"id":"1"}]', "1").empty
    for header in (None, "", "-1", "many"):
        with pytest.raises(ValueError):
            wire.Page.from_response(b"[]", header)


def test_a_write_pause_round_trips_within_its_bounds() -> None:
    pause = wire.WritePause("switchover-1", 5.0)
    assert wire.WritePause.from_json(_through_json(pause.to_json())) == pause
    assert wire.WritePause.from_json({"holder": "h", "seconds": 3}) == wire.WritePause("h", 3.0)
    resume = wire.WriteResume("switchover-1")
    assert wire.WriteResume.from_json(_through_json(resume.to_json())) == resume
    for bad in (0, -1, wire.MAX_WRITE_PAUSE_SECONDS + 0.5, "5", None, True):
        with pytest.raises(errors.InvalidInput, match="seconds must be a number"):
            wire.WritePause.from_json({"holder": "h", "seconds": bad})
    for holder in (None, "", "x" * 129, "tab\there", 5):
        with pytest.raises(errors.InvalidInput, match="holder must be"):
            wire.WriteResume.from_json({"holder": holder})


@pytest.mark.parametrize("up_to", [None, 1, INT64_MAX])
def test_a_read_mark_and_its_result_round_trip(up_to: int | None) -> None:
    mark = wire.ReadMark(KEY, BORIS, ANNA, up_to, 5, "req-7")
    assert wire.ReadMark.from_json(_through_json(mark.to_json())) == mark
    result = wire.ReadResult(up_to, 3)
    assert wire.ReadResult.from_json(_through_json(result.to_json())) == result


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"dialog_key": KEY + 1}, "dialog_key must be the dialog key of reader and other"),
        ({"reader": "nobody"}, "reader must be a UUID"),
        ({"up_to": "0"}, "up_to must be a message id"),
        ({"up_to": "12a"}, "up_to must be a message id"),
        ({"up_to": "１２"}, "up_to must be a message id"),  # full-width digits: isdigit(), not ASCII
        ({"up_to": str(INT64_MAX + 1)}, "up_to must be a message id"),
        ({"up_to": False}, "up_to must be a message id"),
        ({"map_version": "5"}, "map_version must be an integer"),
    ],
)
def test_a_worker_checks_a_read_mark(changes: dict[str, object], message: str) -> None:
    raw = {**wire.ReadMark(KEY, ANNA, BORIS, 10, 5, "r").to_json(), **changes}
    with pytest.raises(errors.InvalidInput, match=message):
        wire.ReadMark.from_json(raw)


@pytest.mark.parametrize("answer", [None, [], {"up_to": "1"}, {"up_to": "x", "unread": 1}, {"up_to": 5, "unread": 1}])
def test_a_malformed_read_answer_is_not_taken_for_a_result(answer: object) -> None:
    with pytest.raises(ValueError):
        wire.ReadResult.from_json(answer)


def test_an_inbox_query_and_unread_totals_round_trip() -> None:
    query = wire.InboxQuery(user_key(ANNA), ANNA, 12345, 50, 7, "req 9/x")
    assert wire.InboxQuery.from_query(dict(parse_qsl(query.to_query()))) == query
    totals = wire.UnreadTotals(12, 3)
    assert wire.UnreadTotals.from_json(_through_json(totals.to_json())) == totals


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"user_key": str(user_key(BORIS))}, "user_key must be the key of owner"),
        ({"owner": "nobody"}, "owner must be a UUID"),
        ({"limit": "0"}, "limit"),
        ({"before": "0"}, "before"),
    ],
)
def test_a_worker_checks_an_inbox_query(changes: dict[str, str], message: str) -> None:
    raw = {**dict(parse_qsl(wire.InboxQuery(user_key(ANNA), ANNA, 10, 5, 1, "r").to_query())), **changes}
    with pytest.raises(errors.InvalidInput, match=message):
        wire.InboxQuery.from_query(raw)


@pytest.mark.parametrize("answer", [None, [], {"total": 1}, {"total": "1", "dialogs": 1}])
def test_malformed_unread_totals_are_not_taken_for_totals(answer: object) -> None:
    with pytest.raises(ValueError):
        wire.UnreadTotals.from_json(answer)


def test_a_channel_answer_round_trips_with_its_status() -> None:
    for status, body in ((200, b'[{"status": 200}]'), (503, b'{"code": 503}'), (200, b"")):
        assert wire.channel_answer(wire.channel_reply(status, body)) == (status, body)
    assert wire.channel_answer(b"200\n1\n2") == (200, b"1\n2")  # the body may hold newlines


@pytest.mark.parametrize("message", [b"", b"[]", b"200", b"20\n[]", b"2000\n[]", b"ok!\n[]", b"-20\n[]"])
def test_a_malformed_channel_answer_is_broken_not_misread(message: bytes) -> None:
    with pytest.raises(ValueError):
        wire.channel_answer(message)


def test_an_inbox_query_round_trips_in_a_batch_with_the_same_bounds() -> None:
    query = wire.InboxQuery(user_key(ANNA), ANNA, 12345, wire.MAX_LIST_LIMIT, 7, "req 9/x")
    assert wire.InboxQuery.from_json(_through_json(query.to_json())) == query
    raw = query.to_json()
    for name, value in [("limit", 0), ("limit", wire.MAX_LIST_LIMIT + 1), ("before", 0), ("limit", "5")]:
        with pytest.raises(errors.InvalidInput, match=f"{name} must be an integer from"):
            wire.InboxQuery.from_json({**raw, name: value})
    with pytest.raises(errors.InvalidInput, match="user_key must be the key of owner"):
        wire.InboxQuery.from_json({**raw, "user_key": user_key(BORIS)})
    with pytest.raises(errors.InvalidInput, match="JSON object"):
        wire.InboxQuery.from_json([raw])


def test_a_batch_of_unread_totals_carries_each_answer_or_its_error() -> None:
    error = errors.RangeNotServed()
    answers = [wire.unread_answer_json(wire.UnreadTotals(3, 1)), wire.error_json(error, "r2")]
    first, refused = wire.decode_unread(orjson.dumps(answers), 2)
    assert first == wire.UnreadTotals(3, 1)
    assert isinstance(refused, errors.RangeNotServed) and refused.to_json("r2") == error.to_json("r2")


@pytest.mark.parametrize(
    "body", [b"", b"{}", b"[]", b'[{"total": 1, "dialogs": 1}]', b'[{"status": 200, "total": 1}]', b"[1]"]
)
def test_a_malformed_batch_of_unread_totals_is_broken_not_misread(body: bytes) -> None:
    with pytest.raises(ValueError):
        wire.decode_unread(body, 1)
