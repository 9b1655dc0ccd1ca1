"""Event-time merge of partitions: the order the live worker scores a batch in, and the
order a replay reads its range in."""

from __future__ import annotations

import random

from streams.ordering import event_time_order


def test_merge_keeps_each_partition_in_offset_order_and_is_sorted_when_partitions_are():
    rng = random.Random(3)
    for _ in range(200):
        items = []
        clocks = [0, 0, 0]
        for offset in range(rng.randrange(1, 60)):
            p = rng.randrange(3)
            clocks[p] += rng.randrange(0, 50)
            items.append((p, offset, clocks[p]))
        merged = list(event_time_order(items, partition=lambda x: x[0], ts=lambda x: x[2]))
        assert sorted(merged) == sorted(items)
        for p in range(3):
            assert [x for x in merged if x[0] == p] == [x for x in items if x[0] == p]
        assert [x[2] for x in merged] == sorted(x[2] for x in merged)  # each partition in time order here


def test_a_late_event_does_not_jump_ahead_of_its_own_partition():
    items = [("a", 10), ("a", 2), ("b", 5)]
    assert list(event_time_order(items, partition=lambda x: x[0], ts=lambda x: x[1])) == [("b", 5), ("a", 10), ("a", 2)]
