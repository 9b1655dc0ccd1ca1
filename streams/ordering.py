"""Processing a batch of events from several partitions in event-time order.

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
