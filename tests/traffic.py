"""Continuous senders and readers over many dialogs and several proxies, for resharding tests.

Each dialog has one sender that sends sequentially (the next message after the previous
was acknowledged), so the acknowledged order is the order the dialog must show. Readers
remember how many messages of a dialog were acknowledged before their read began, and
record a violation if the read shows fewer, or shows them out of order.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from dataclasses import dataclass, field

from dialogs.keys import dialog_key
from tests.support import Api, Cluster


@dataclass
class Dialog:
    sender: str
    sender_token: str
    recipient: str
    recipient_token: str
    acked: list[tuple[str, str]] = field(default_factory=list)  # (id, text), in send order


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
            token, other = rng.choice(
                [(dialog.sender_token, dialog.recipient), (dialog.recipient_token, dialog.sender)]
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
            await asyncio.sleep(0.005)


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
    """Every acknowledged message readable exactly once, in order, from both participants."""
    total = 0
    for dialog in dialogs:
        expected = [text for _, text in reversed(dialog.acked)]
        expected_ids = [message_id for message_id, _ in reversed(dialog.acked)]
        for token, other in ((dialog.sender_token, dialog.recipient), (dialog.recipient_token, dialog.sender)):
            listed = await cluster.api.whole_dialog(token, other, page=500)
            assert [m["text"] for m in listed] == expected
            assert [m["id"] for m in listed] == expected_ids
        total += len(expected)
    return total


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
        leftovers = await cluster.shard_fetch(shard_id, "SELECT count(*) FROM migration_delta")
        assert leftovers[0][0] == 0
    assert seen == total
