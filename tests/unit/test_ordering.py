"""Event-time merge of partitions: the order the live worker scores a batch in, and the
order a replay reads its range in; when a busy worker takes its next batch."""

from __future__ import annotations

import random

import pytest

from streams.ordering import BatchPacing, event_time_order


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


def test_a_busy_worker_takes_at_most_one_batch_per_interval_and_waits_only_the_rest_of_it():
    pacing = BatchPacing(interval_s=0.010)
    assert pacing.wait_s(now=100.0) == 0.0  # nothing taken yet
    pacing.started(now=100.0)
    assert pacing.wait_s(now=100.0) == pytest.approx(0.010)
    assert pacing.wait_s(now=100.003) == pytest.approx(0.007)
    assert pacing.wait_s(now=100.010) == 0.0
    pacing.started(now=100.025)
    assert pacing.wait_s(now=100.031) == pytest.approx(0.004)
    assert pacing.wait_s(now=100.040) == 0.0  # a batch that took longer than the interval: the next at once


def test_no_batch_interval_never_waits_and_a_negative_one_is_refused():
    pacing = BatchPacing(interval_s=0.0)
    pacing.started(now=7.0)
    assert pacing.wait_s(now=7.0) == 0.0
    with pytest.raises(ValueError, match="0 or more seconds"):
        BatchPacing(interval_s=-0.01)
