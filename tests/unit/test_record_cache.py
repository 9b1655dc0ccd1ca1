"""The worker's state reads between batches (streams/state.py RecordCache, ShardPresence)."""

from __future__ import annotations

import orjson

from streams.state import RecordCache, ShardPresence, shard_key


class Store(dict):
    """A partition store's ``get`` that counts its reads."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.reads: list[bytes] = []

    def get(self, key: bytes) -> bytes | None:  # type: ignore[override]
        self.reads.append(key)
        return super().get(key)


def test_a_record_is_read_and_decoded_once_then_kept():
    store = Store({b"a": orjson.dumps({"l": 1})})
    cache = RecordCache(capacity=10)
    first = cache.read(("user", b"a"), store.get)
    assert first == {"l": 1}
    assert cache.read(("user", b"a"), store.get) is first  # the same object: extract updates it in place
    assert store.reads == [b"a"] and (cache.hits, cache.misses) == (1, 1)


def test_an_absent_record_is_not_kept():
    store = Store()
    cache = RecordCache(capacity=10)
    assert cache.read(("ip", b"1|c"), store.get) is None
    store[b"1|c"] = b'{"l": 3}'
    assert cache.read(("ip", b"1|c"), store.get) == {"l": 3}
    assert store.reads == [b"1|c", b"1|c"] and len(cache) == 1


def test_the_least_recently_used_record_goes_first():
    store = Store({b"a": b'{"l": 1}', b"b": b'{"l": 2}', b"1|c": b'{"l": 3}'})
    cache = RecordCache(capacity=2)
    cache.keep({("user", b"a"): ({"l": 1}, 0), ("user", b"b"): ({"l": 2}, 0)})
    assert cache.read(("user", b"a"), store.get) == {"l": 1}  # read: now the most recent
    cache.keep({("ip", b"1|c"): ({"l": 3}, 1)})
    assert store.reads == []
    assert cache.read(("user", b"b"), store.get) == {"l": 2} and store.reads == [b"b"]  # it had gone
    assert cache.read(("ip", b"1|c"), store.get) == {"l": 3} and store.reads == [b"b"]
    assert cache.read(("user", b"a"), store.get) == {"l": 1} and store.reads == [b"b", b"a"]  # pushed out by b
    assert len(cache) == 2


def test_a_written_record_replaces_the_kept_one_and_deleted_or_moved_ones_go():
    store = Store()
    cache = RecordCache(capacity=10)
    cache.keep({("user", b"a"): ({"l": 1}, 0), ("user", b"b"): ({"l": 2}, 0)})
    cache.keep({("user", b"a"): ({"l": 5}, 0)})
    assert cache.read(("user", b"a"), store.get) == {"l": 5}
    cache.discard(("user", b"a"))  # the expiry sweep deleted it
    assert cache.read(("user", b"a"), store.get) is None and store.reads == [b"a"]
    cache.clear()  # partitions may move
    assert len(cache) == 0


def test_capacity_zero_keeps_nothing():
    store = Store({b"a": b'{"l": 1}'})
    cache = RecordCache(capacity=0)
    cache.keep({("user", b"a"): ({"l": 1}, 0)})
    assert len(cache) == 0
    assert cache.read(("user", b"a"), store.get) == {"l": 1}
    assert cache.read(("user", b"a"), store.get) == {"l": 1}
    assert len(cache) == 0 and store.reads == [b"a", b"a"]


def test_shard_presence_reads_the_stores_once_per_entity_then_follows_the_writes():
    stores = {("ip", 0): {shard_key(0, "1.2.3.4")}, ("ip", 2): {shard_key(2, "1.2.3.4")}}
    reads: list[tuple[str, int, str]] = []

    def exists(entity: str, partition: int, key: str) -> bool:
        reads.append((entity, partition, key))
        return shard_key(partition, key) in stores.get((entity, partition), set())

    presence = ShardPresence(capacity=10)
    assert presence.partitions("ip", "1.2.3.4", [0, 1, 2, 3], exists) == 0b101
    assert presence.partitions("ip", "1.2.3.4", [0, 1, 2, 3], exists) == 0b101  # kept as found
    assert len(reads) == 4
    presence.add("ip", "1.2.3.4", 3)  # the worker wrote the shard of partition 3
    presence.add("ip", "5.6.7.8", 1)  # not known yet: found in the stores when first asked
    assert presence.partitions("ip", "1.2.3.4", [0, 1, 2, 3], exists) == 0b1101
    assert len(reads) == 4
    assert presence.partitions("device", "1.2.3.4", [0, 1, 2, 3], exists) == 0  # another entity, other tables
    assert len(reads) == 8 and len(presence) == 2


def test_shard_presence_forgets_everything_when_full_or_cleared():
    reads: list[int] = []

    def exists(entity: str, partition: int, key: str) -> bool:
        reads.append(partition)
        return True

    presence = ShardPresence(capacity=2)
    presence.partitions("ip", "a", [0, 1], exists)
    presence.partitions("ip", "b", [0, 1], exists)
    presence.partitions("ip", "c", [0, 1], exists)  # the third forgets a and b
    assert len(presence) == 1 and len(reads) == 6
    assert presence.partitions("ip", "a", [0, 1], exists) == 0b11 and len(reads) == 8
    presence.clear()  # partitions may move
    assert len(presence) == 0
    assert presence.partitions("ip", "c", [0, 1], exists) == 0b11 and len(reads) == 10
