"""When the worker sweeps idle entities out of a partition's stores."""

from __future__ import annotations

from streams.state import ExpirySweeper


def test_a_sweep_is_due_every_so_many_events_of_a_partition_counted_one_or_a_batch_at_a_time():
    """The worker records a batch's events of a partition at once: a slice is due each time the
    count passes a multiple of ``every_events``, as when they are recorded one by one."""
    one_by_one, batched = ExpirySweeper(every_events=5), ExpirySweeper(every_events=5)
    due_one_by_one = [(n, one_by_one.observe(0, ts=n)) for n in range(1, 24)]
    due_batched = [(events, batched.observe(0, ts=ts, events=events)) for events, ts in [(3, 3), (4, 7), (1, 8), (11, 19)]]
    assert [n for n, due in due_one_by_one if due] == [5, 10, 15, 20] and {due for _, due in due_one_by_one} == {0, 1}
    assert due_batched == [(3, 0), (4, 1), (1, 0), (11, 2)]  # past 5; past 10 and 15: two slices
    assert (one_by_one.watermarks, batched.watermarks) == ({0: 23}, {0: 19})  # the latest event time seen
    assert not batched.observe(1, ts=2, events=4) and batched.watermarks[1] == 2  # partitions count apart
