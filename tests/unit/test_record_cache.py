"""The worker's decoded records between batches (streams/state.py RecordCache)."""

from __future__ import annotations

from streams.state import RecordCache


def test_the_least_recently_used_record_goes_first():
    cache = RecordCache(capacity=2)
    cache.keep({("user", b"a"): ({"l": 1}, 0), ("user", b"b"): ({"l": 2}, 0)})
    assert cache.get(("user", b"a")) == {"l": 1}  # read: now the most recent
    cache.keep({("ip", b"1|c"): ({"l": 3}, 1)})
    assert cache.get(("user", b"b")) is None
    assert cache.get(("user", b"a")) == {"l": 1} and cache.get(("ip", b"1|c")) == {"l": 3}
    assert (cache.hits, cache.misses) == (3, 1)


def test_a_written_record_replaces_the_kept_one_and_deleted_or_moved_ones_go():
    cache = RecordCache(capacity=10)
    cache.keep({("user", b"a"): ({"l": 1}, 0), ("user", b"b"): ({"l": 2}, 0)})
    cache.keep({("user", b"a"): ({"l": 5}, 0)})
    assert cache.get(("user", b"a")) == {"l": 5}
    cache.discard(("user", b"a"))  # the expiry sweep deleted it
    assert cache.get(("user", b"a")) is None and len(cache) == 1
    cache.clear()  # partitions may move
    assert len(cache) == 0


def test_capacity_zero_keeps_nothing():
    cache = RecordCache(capacity=0)
    cache.keep({("user", b"a"): ({"l": 1}, 0)})
    assert cache.get(("user", b"a")) is None and len(cache) == 0
