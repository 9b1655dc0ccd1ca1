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


def test_a_slice_of_a_store_gives_its_idle_records_not_held_and_where_the_next_starts():
    from detectors.catalog import IP
    from detectors.worker_state import EntityReads

    reads = EntityReads(lambda entity, partition: {}.get, lambda entity, key, partitions: (), lambda entity, key: None,
                        partitions=1, interval_s=1.0)
    reads.begin_batch({0})
    old, fresh = b'{"f":1,"l":1,"r":{}}', b'{"f":1,"l":%d}' % IP.idle_expiry_ms
    watermark = IP.idle_expiry_ms + 10
    store = [(b"__offset__", b"42"), (b"0|a", old), (b"0|b", fresh), (b"0|c", old), (b"0|d", old), (b"0|e", old)]
    reads.hold("ip", 0, "c", {"f": 1, "l": 1}, offset=1)  # a newer record waits to be written
    sweeper = ExpirySweeper(slice_keys=4)
    idle, last = reads.idle_among("ip", iter(store), watermark, sweeper.slice_keys, b"__offset__")
    assert (idle, last) == ([b"0|a"], b"0|c"), "four keys taken: the offset key, the fresh and the held left alone"
    sweeper.advance("ip", 0, last)
    assert sweeper.cursor("ip", 0) == b"0|c\x00"
    rest = [item for item in store if item[0] >= sweeper.cursor("ip", 0)]
    assert reads.idle_among("ip", iter(rest), watermark, sweeper.slice_keys, b"__offset__") == ([b"0|d", b"0|e"], None)
    sweeper.advance("ip", 0, None)  # the store's end: the next slice starts from its first key
    assert sweeper.cursor("ip", 0) is None
