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

from tests.support import Api


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

    async def run(self, stop: asyncio.Event, senders: int = 6, readers: int = 3) -> None:
        groups = [self.dialogs[i::senders] for i in range(senders)]
        tasks = [self._send(group, stop, index) for index, group in enumerate(groups) if group]
        tasks += [self._read(stop, index) for index in range(readers)]
        await asyncio.gather(*tasks)

    async def _send(self, dialogs: list[Dialog], stop: asyncio.Event, index: int) -> None:
        proxies = itertools.cycle(self.apis[index % len(self.apis):] + self.apis[:index % len(self.apis)])
        for turn in itertools.count():
            if stop.is_set():
                return
            dialog = dialogs[turn % len(dialogs)]
            text = f"{dialog.sender[:8]}>{dialog.recipient[:8]} #{len(dialog.acked)}"
            reply = await next(proxies).send(dialog.sender_token, dialog.recipient, text)
            if reply.status == 200:
                dialog.acked.append((reply.json["id"], text))
            else:
                self.failures.append(f"send {reply.status}: {reply.body[:200]!r}")
                await asyncio.sleep(0.01)

    async def _read(self, stop: asyncio.Event, index: int) -> None:
        rng = random.Random(index)
        while not stop.is_set():
            dialog = rng.choice(self.dialogs)
            before = list(dialog.acked)
            api = rng.choice(self.apis)
            token, other = rng.choice(
                [(dialog.sender_token, dialog.recipient), (dialog.recipient_token, dialog.sender)]
            )
            reply = await api.list(token, other, limit=1000)
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
