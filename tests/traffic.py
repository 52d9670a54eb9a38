"""Continuous senders and readers over many dialogs and several proxies, for resharding tests.

Each dialog has one sender that sends sequentially (the next message after the previous
was acknowledged), so the acknowledged order is the order the dialog must show. Readers
remember how many messages of a dialog were acknowledged before their read began, and
record a violation if the read shows fewer, or shows them out of order. After a read, a
reader often marks the dialog read up to one of the messages it saw, as the side it read
as; the mark answered must never go back (marks only move forward), and at the end each
side's mark and unread count are checked against what the run acknowledged.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dialogs.keys import dialog_key, user_key
from proxy import inbox_verify
from tests.support import Api, Cluster


@dataclass
class Dialog:
    sender: str
    sender_token: str
    recipient: str
    recipient_token: str
    acked: list[tuple[str, str]] = field(default_factory=list)  # (id, text), in send order
    # The newest read mark the service answered for each side (the user id), as an int.
    marks: dict[str, int] = field(default_factory=dict)


@dataclass
class Traffic:
    apis: list[Api]
    dialogs: list[Dialog]
    failures: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    reads: int = 0
    slowest: float = 0.0  # seconds: the longest any send or read waited for its answer
    # Clients that retry a failed send with its Idempotency-Key until it is acknowledged
    # (a 503 may have stored it), as the API asks of clients; otherwise a failure moves on.
    retry_with_key: bool = False
    # (loop time it started, loop time its answer came, the dialog, its status) of every send attempt.
    sends: list[tuple[float, float, Dialog, int]] = field(default_factory=list)
    pause: float = 0.0  # seconds each sender waits after an acknowledged send (long runs stay within a page)

    def _took(self, started: float) -> None:
        self.slowest = max(self.slowest, asyncio.get_running_loop().time() - started)

    async def run(self, stop: asyncio.Event, senders: int = 6, readers: int = 3) -> None:
        groups = [self.dialogs[i::senders] for i in range(senders)]
        tasks = [self._send(group, stop, index) for index, group in enumerate(groups) if group]
        tasks += [self._read(stop, index) for index in range(readers)]
        await asyncio.gather(*tasks)

    async def _send(self, dialogs: list[Dialog], stop: asyncio.Event, index: int) -> None:
        proxies = itertools.cycle(self.apis[index % len(self.apis) :] + self.apis[: index % len(self.apis)])
        for turn in itertools.count():
            if stop.is_set():
                return
            dialog = dialogs[turn % len(dialogs)]
            text = f"{dialog.sender[:8]}>{dialog.recipient[:8]} #{len(dialog.acked)}"
            key = f"m{len(dialog.acked)}" if self.retry_with_key else None
            while True:
                started = asyncio.get_running_loop().time()
                reply = await next(proxies).send(dialog.sender_token, dialog.recipient, text, key=key)
                self._took(started)
                self.sends.append((started, asyncio.get_running_loop().time(), dialog, reply.status))
                if reply.status == 200:
                    dialog.acked.append((reply.json["id"], text))
                    if self.pause:
                        await asyncio.sleep(self.pause)
                    break
                self.failures.append(f"send {reply.status}: {reply.body[:200]!r}")
                await asyncio.sleep(0.05)
                if not self.retry_with_key:
                    break

    async def _read(self, stop: asyncio.Event, index: int) -> None:
        rng = random.Random(index)
        while not stop.is_set():
            dialog = rng.choice(self.dialogs)
            before = list(dialog.acked)
            api = rng.choice(self.apis)
            token, other, reader = rng.choice(
                [
                    (dialog.sender_token, dialog.recipient, dialog.sender),
                    (dialog.recipient_token, dialog.sender, dialog.recipient),
                ]
            )
            started = asyncio.get_running_loop().time()
            reply = await api.list(token, other, limit=1000)
            self._took(started)
            self.reads += 1
            if reply.status != 200:
                self.failures.append(f"list {reply.status}: {reply.body[:200]!r}")
                continue
            listed = [(m["id"], m["text"]) for m in reversed(reply.json)]
            if len(before) >= 1000:
                # One page no longer holds the whole dialog: this check would prove nothing.
                self.violations.append("a dialog outgrew one page (1000): make the test run shorter")
            elif listed[: len(before)] != before:
                self.violations.append(
                    f"read of {dialog.sender[:8]}/{dialog.recipient[:8]} showed {len(listed)} messages,"
                    f" {len(before)} were acknowledged before it began"
                )
            if listed and rng.random() < 0.5:
                await self._mark(api, token, other, dialog, reader, rng.choice(listed)[0])
            await asyncio.sleep(0.005)

    async def _mark(self, api: Api, token: str, other: str, dialog: Dialog, reader: str, up_to: str) -> None:
        started = asyncio.get_running_loop().time()
        reply = await api.read(token, other, up_to)
        self._took(started)
        if reply.status != 200:
            self.failures.append(f"read mark {reply.status}: {reply.body[:200]!r}")
            return
        stored = int(reply.json["up_to"])
        if stored < max(int(up_to), dialog.marks.get(reader, 0)):
            self.violations.append(
                f"a read mark went back: {reader[:8]} marked {up_to}, had {dialog.marks.get(reader)}, got {stored}"
            )
        dialog.marks[reader] = max(stored, dialog.marks.get(reader, 0))


async def make_dialogs(cluster: Cluster, people: int = 24, count: int = 30) -> list[Dialog]:
    users = [await cluster.api.user(f"User{i}") for i in range(people)]
    rng = random.Random(11)
    pairs: set[tuple[int, int]] = set()
    while len(pairs) < count:
        a, b = rng.sample(range(people), 2)
        if (b, a) not in pairs:
            pairs.add((a, b))
    return [Dialog(users[a][0], users[a][1], users[b][0], users[b][1]) for a, b in sorted(pairs)]


async def check_every_dialog(cluster: Cluster, dialogs: list[Dialog]) -> int:
    """Every acknowledged message readable exactly once, in order, from both participants;
    each side's read mark is the newest it was answered, and its unread count is the other
    side's acknowledged messages past it."""
    total = 0
    for dialog in dialogs:
        await check_marks(cluster.api, dialog)
        expected = [text for _, text in reversed(dialog.acked)]
        expected_ids = [message_id for message_id, _ in reversed(dialog.acked)]
        for token, other in ((dialog.sender_token, dialog.recipient), (dialog.recipient_token, dialog.sender)):
            listed = await cluster.api.whole_dialog(token, other, page=500)
            assert [m["text"] for m in listed] == expected
            assert [m["id"] for m in listed] == expected_ids
        total += len(expected)
    return total


async def check_marks(api: Api, dialog: Dialog) -> None:
    """Ask each side's mark with the dialog's oldest message (which moves no mark forward but
    one never set): the answer is the stored mark and the unread count."""
    if not dialog.acked:
        return
    oldest = int(dialog.acked[0][0])
    for token, other, reader in (
        (dialog.sender_token, dialog.recipient, dialog.sender),
        (dialog.recipient_token, dialog.sender, dialog.recipient),
    ):
        reply = await api.read(token, other, str(oldest))
        assert reply.status == 200, reply.body
        expected = max(dialog.marks.get(reader, 0), oldest)
        assert int(reply.json["up_to"]) == expected, (reader, reply.json, dialog.marks.get(reader))
        # Only the sender sends in these dialogs.
        theirs = [int(i) for i, _ in dialog.acked] if reader == dialog.recipient else []
        assert reply.json["unread"] == sum(i > expected for i in theirs), (reader, reply.json)
        dialog.marks[reader] = expected  # the service answered it: the mark now stored


async def check_placement(cluster: Cluster, shard_ids: list[str], total: int) -> None:
    """Rows are exactly where the active ring says, and nowhere else."""
    active = await cluster.active_map()
    seen = 0
    for shard_id in shard_ids:
        rows = await cluster.shard_fetch(shard_id, "SELECT dialog_key, user_lo, user_hi FROM messages")
        for row in rows:
            assert row["dialog_key"] == dialog_key(row["user_lo"], row["user_hi"])
            assert active.owner(row["dialog_key"]) == shard_id, (
                f"a row of {active.owner(row['dialog_key'])} is on {shard_id}"
            )
        seen += len(rows)
        # Each dialog's state row is with its messages, once, and its counts are a recount's.
        states = await cluster.shard_fetch(
            shard_id,
            """
            SELECT s.dialog_key, s.sent_lo, s.sent_hi, s.read_count_lo, s.read_count_hi,
                   count(m.id) FILTER (WHERE m.from_lo) AS lo, count(m.id) FILTER (WHERE NOT m.from_lo) AS hi,
                   count(m.id) FILTER (WHERE NOT m.from_lo AND m.id <= s.read_lo) AS read_lo,
                   count(m.id) FILTER (WHERE m.from_lo AND m.id <= s.read_hi) AS read_hi
            FROM dialog_state s LEFT JOIN messages m USING (dialog_key, user_lo, user_hi)
            GROUP BY s.dialog_key, s.user_lo, s.user_hi
            """,
        )
        dialogs_here = await cluster.shard_fetch(
            shard_id, "SELECT count(*) FROM (SELECT DISTINCT dialog_key, user_lo, user_hi FROM messages) AS d"
        )
        assert len(states) == dialogs_here[0][0], f"{shard_id}: {len(states)} states, {dialogs_here[0][0]} dialogs"
        for state in states:
            assert active.owner(state["dialog_key"]) == shard_id
            assert (state["sent_lo"], state["sent_hi"]) == (state["lo"], state["hi"]), dict(state)
            assert (state["read_count_lo"], state["read_count_hi"]) == (state["read_lo"], state["read_hi"]), dict(state)
        leftovers = await cluster.shard_fetch(
            shard_id, "SELECT (SELECT count(*) FROM migration_delta) + (SELECT count(*) FROM inbox_delta)"
        )
        assert leftovers[0][0] == 0
        # Inbox rows and totals are on the shard that owns their user's key, and nowhere else.
        for row in await cluster.shard_fetch(
            shard_id, "SELECT user_key, owner FROM inbox UNION SELECT user_key, owner FROM inbox_totals"
        ):
            assert row["user_key"] == user_key(row["owner"])
            assert active.owner(row["user_key"]) == shard_id, (
                f"an inbox row of {active.owner(row['user_key'])} is on {shard_id}"
            )
    assert seen == total
    await check_inbox_recount(cluster)


async def check_inbox_recount(cluster: Cluster) -> None:
    """`dialogs inbox verify` finds no difference: every inbox row and total is the recount
    of the dialogs' states (which check_placement recounts from the messages)."""
    active = await cluster.active_map()
    report = await inbox_verify.verify({s: cluster.dsn(s) for s in active.shard_ids}, active, settle=30)
    assert report.differences == 0 and report.pending == 0, report.to_json()
    assert report.rows > 0


def _shows(
    conversations: dict[str, tuple[str, int]], badge: dict[str, int]
) -> Callable[[list[dict[str, Any]], dict[str, int]], bool]:
    def shown(items: list[dict[str, Any]], totals: dict[str, int]) -> bool:
        return {
            i["user_id"]: (i["last_message"]["id"], i["unread"]) for i in items
        } == conversations and totals == badge

    return shown


async def check_inboxes(api: Api, dialogs: list[Dialog]) -> None:
    """Each user's inbox, as the API shows it: one conversation per dialog with a message, its
    last message the newest acknowledged, its unread count the other side's acknowledged
    messages past the user's mark; the badge their sums."""
    expected: dict[str, dict[str, tuple[str, int]]] = {}
    tokens: dict[str, str] = {}
    for dialog in dialogs:
        tokens[dialog.sender], tokens[dialog.recipient] = dialog.sender_token, dialog.recipient_token
        if not dialog.acked:
            continue
        newest = dialog.acked[-1][0]
        mark = dialog.marks.get(dialog.recipient, 0)
        unread = sum(int(i) > mark for i, _ in dialog.acked)
        expected.setdefault(dialog.sender, {})[dialog.recipient] = (newest, 0)
        expected.setdefault(dialog.recipient, {})[dialog.sender] = (newest, unread)
    for user, conversations in expected.items():
        want_total = {
            "total": sum(u for _, u in conversations.values()),
            "dialogs": sum(u > 0 for _, u in conversations.values()),
        }
        items, totals = await api.settled_inbox(tokens[user], _shows(conversations, want_total))
        assert {i["user_id"]: (i["last_message"]["id"], i["unread"]) for i in items} == conversations, user
        assert totals == want_total, user
        ids = [int(i["last_message"]["id"]) for i in items]
        assert ids == sorted(ids, reverse=True), "newest first"
