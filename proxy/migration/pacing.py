"""How the copy phase cuts its work and keeps its pace: pure decisions, no I/O.

The runner's ``_copy`` carries them out: each ``CopyBatch`` is one checkpointed step.
Small ranges travel together (one ``COPY`` for many, so a ring of thousands of tiny
ranges is not thousands of round trips); a large range, or one whose copy was resumed
from a checkpoint, is copied alone, in key order, ``batch_size`` rows at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dialogs.metastore.migrations import RangeCopy


@dataclass(frozen=True, slots=True)
class CopyBatch:
    ranges: tuple[RangeCopy, ...]
    in_steps: bool  # one range, copied batch_size rows at a time from its cursor


def copy_batches(pending: Sequence[RangeCopy], batch_size: int) -> list[CopyBatch]:
    """``pending`` (one source-target pair's ranges not yet copied) cut into steps, in order:
    small ranges gathered until their estimated rows reach ``batch_size``."""
    batches: list[CopyBatch] = []
    chunk: list[RangeCopy] = []
    estimate = 0
    for state in pending:
        if state.rows_estimate > batch_size or state.cursor is not None:
            if chunk:
                batches.append(CopyBatch(tuple(chunk), in_steps=False))
                chunk, estimate = [], 0
            batches.append(CopyBatch((state,), in_steps=True))
            continue
        chunk.append(state)
        estimate += state.rows_estimate
        if estimate >= batch_size:
            batches.append(CopyBatch(tuple(chunk), in_steps=False))
            chunk, estimate = [], 0
    if chunk:
        batches.append(CopyBatch(tuple(chunk), in_steps=False))
    return batches


def pause_after(rows: int, seconds_taken: float, rows_per_second: int) -> float:
    """Seconds to wait after copying ``rows`` in ``seconds_taken`` so the copy keeps to
    ``rows_per_second`` (0: unthrottled)."""
    if rows_per_second <= 0 or rows <= 0:
        return 0.0
    return max(0.0, rows / rows_per_second - seconds_taken)
