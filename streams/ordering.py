"""Batches of events: when a busy worker takes the next, and processing one from several
partitions in event-time order.

A worker that lags reads its partitions in fetch-sized chunks, so partitions
drift apart in event time: one may be minutes of event time ahead of another.
Entity state merged across partitions (an IP seen on all of them) would then
count events from another partition's "future" and miss events from its
"past". Like Kafka Streams' timestamp-based record selection, each batch is
replayed as a k-way merge: always the earliest head among the partitions,
while each partition keeps its own offset order (records never apply an older
offset after a newer one, which their idempotence relies on).

>>> batch = [("p0", 10), ("p0", 30), ("p1", 20), ("p1", 5), ("p0", 40)]
>>> [ts for _, ts in event_time_order(batch, partition=lambda x: x[0], ts=lambda x: x[1])]
[10, 20, 5, 30, 40]
"""

from __future__ import annotations

import heapq
import math
from typing import Callable, Hashable, Iterator, Sequence, TypeVar

T = TypeVar("T")


def event_time_order(items: Sequence[T], partition: Callable[[T], Hashable],
                     ts: Callable[[T], int]) -> Iterator[T]:
    """``items`` in arrival order; yields them merged by event time, per-partition order kept."""
    queues: dict[Hashable, list[T]] = {}
    for item in items:
        queues.setdefault(partition(item), []).append(item)
    if len(queues) == 1:
        yield from items
        return
    positions = dict.fromkeys(queues, 0)
    heads = [(ts(q[0]), n, p) for n, (p, q) in enumerate(queues.items())]
    heapq.heapify(heads)
    while heads:
        _, n, p = heads[0]
        queue, i = queues[p], positions[p]
        yield queue[i]
        i += 1
        positions[p] = i
        if i < len(queue):
            heapq.heapreplace(heads, (ts(queue[i]), n, p))
        else:
            heapq.heappop(heads)


class BatchPacing:
    """When a busy worker takes its next batch of events: at most one batch starts every
    ``interval_s`` while events keep arriving, so each gathers what arrives in that time. A
    worker that took the next batch as soon as the last ended scored many small ones, each
    paying a batch's fixed costs, and its latency had a longer tail (docs/performance.md,
    round 29). The caller asks only while busy: the first batch after an idle look starts
    at once.

    >>> pacing = BatchPacing(interval_s=0.010)
    >>> pacing.wait_s(now=5.000)
    0.0
    >>> pacing.started(now=5.000)
    >>> round(pacing.wait_s(now=5.007), 3)  # the rest of the interval
    0.003
    >>> pacing.wait_s(now=5.012)  # the last batch took longer: at once
    0.0
    """

    def __init__(self, interval_s: float) -> None:
        if interval_s < 0:
            raise ValueError(f"the batch interval must be 0 or more seconds, got {interval_s}")
        self.interval_s = interval_s
        self._last_start = -math.inf

    def wait_s(self, now: float) -> float:
        """How long to wait, at ``now`` (monotonic seconds), before taking the next batch."""
        return max(0.0, self._last_start + self.interval_s - now)

    def started(self, now: float) -> None:
        """A batch was taken at ``now``."""
        self._last_start = now
