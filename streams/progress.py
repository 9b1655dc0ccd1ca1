"""Every input offset processed: the worker's guard against records its consumer never delivers.

Faust treats any jump in a partition's offsets as a legitimate gap (transaction markers,
compaction): it commits past it. After rebalances under load it can also leave a
partition assigned but never fetched (faust-streaming issues #629, #166). Either way
events would go unscored (or labels unlearned) without an error. This module keeps, per
partition of an input topic this worker owns, the next offset it must process, and says
what to do when the consumer disagrees:

- a record arrives past the next offset: the records in between are read from the broker
  directly and processed first (a range with no records, such as transaction markers, is
  a real gap and is accepted);
- a partition has records beyond the next offset but nothing arrives for
  ``stall_after_s``: seek the consumer back to the next offset; if that does not help
  after ``max_seeks`` tries, ask the group to rebalance.

The offsets come from the broker: the group's committed offset when a partition is
assigned (or the log start when none is committed), then each processed record.

>>> progress = PartitionProgress(stall_after_s=5.0, max_seeks=2)
>>> progress.assigned([0], now=0.0)
>>> progress.start_at(0, 10)
>>> progress.gap_before(0, 10) is None
True
>>> progress.processed(0, 10, now=1.0)
>>> progress.gap_before(0, 14)
(11, 14)
>>> progress.processed(0, 14, now=2.0)
>>> progress.overdue({0: 15}, now=4.0)
[]
>>> progress.overdue({0: 20}, now=7.5)
[Stall(partition=0, next_offset=15, end_offset=20, seeks=0)]
>>> progress.seeked(0, now=7.5)
>>> progress.overdue({0: 20}, now=13.0)
[Stall(partition=0, next_offset=15, end_offset=20, seeks=1)]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping


@dataclass(frozen=True)
class Stall:
    partition: int
    next_offset: int
    end_offset: int
    seeks: int  # seeks already tried since the partition last made progress


class PartitionProgress:
    """Next offset to process per owned partition, and when it last moved."""

    def __init__(self, stall_after_s: float, max_seeks: int = 3) -> None:
        self.stall_after_s = stall_after_s
        self.max_seeks = max_seeks
        self.next_offset: dict[int, int] = {}
        self._moved_at: dict[int, float] = {}
        self._seeks: dict[int, int] = {}
        self.gaps_filled = 0
        self.records_filled = 0
        self.recoveries = 0
        self.unfilled: list[tuple[int, int, int]] = []  # (partition, start, end) that could not be read
        self.generation = 0

    def assigned(self, partitions: Iterable[int], now: float) -> None:
        """A new assignment: where to start is unknown until ``start_at``."""
        self.generation += 1
        self.next_offset.clear()
        self._seeks.clear()
        self._moved_at = {p: now for p in partitions}

    def unknown_start(self) -> list[int]:
        return [p for p in self._moved_at if p not in self.next_offset]

    def start_at(self, partition: int, offset: int, generation: int | None = None) -> None:
        """The committed offset (or log start) of a newly assigned partition, looked up
        during assignment ``generation``; events already scored since the assignment win."""
        if partition in self._moved_at and generation in (None, self.generation):
            self.next_offset.setdefault(partition, offset)

    def gap_before(self, partition: int, offset: int) -> tuple[int, int] | None:
        """The offsets [start, end) skipped before ``offset``, if any."""
        expected = self.next_offset.get(partition)
        if expected is None or offset <= expected:
            return None  # start unknown yet, or a redelivery (state updates are idempotent)
        return expected, offset

    def processed(self, partition: int, offset: int, now: float) -> None:
        if offset + 1 > self.next_offset.get(partition, -1):
            self.next_offset[partition] = offset + 1
        self._moved_at[partition] = now
        self._seeks.pop(partition, None)

    def overdue(self, end_offsets: Mapping[int, int], now: float) -> list[Stall]:
        """Partitions with records past the next offset and no progress for too long."""
        stalls = []
        for partition, end in end_offsets.items():
            expected = self.next_offset.get(partition)
            moved = self._moved_at.get(partition)
            if expected is None or moved is None or end <= expected:
                continue
            if now - moved >= self.stall_after_s:
                stalls.append(Stall(partition, expected, end, self._seeks.get(partition, 0)))
        return stalls

    def seeked(self, partition: int, now: float) -> None:
        """A recovery was tried: wait another ``stall_after_s`` before the next one."""
        self._seeks[partition] = self._seeks.get(partition, 0) + 1
        self._moved_at[partition] = now
        self.recoveries += 1

    def should_rebalance(self, stall: Stall) -> bool:
        return stall.seeks >= self.max_seeks
