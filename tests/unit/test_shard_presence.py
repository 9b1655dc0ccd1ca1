"""Which owned partitions hold a shard of an entity (detectors/worker_state.py ShardPresence), and the
worker's own stores' options."""

from __future__ import annotations

from detectors.worker_state import ShardPresence, shard_key


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


def test_the_workers_own_stores_keep_bloom_filters(tmp_path):
    """Most reads of the replica and reputation stores miss; without a filter each miss
    searched every file (10.5 µs against 0.65 in a 1M-key store, docs/performance.md round 24)."""
    from rocksdict import AccessType, Rdict

    from streams.state import store_options

    db = Rdict(str(tmp_path / "store"), options=store_options(), access_type=AccessType.read_write())
    db[b"k"] = b"v"
    db.close()
    settings = "".join(path.read_text() for path in (tmp_path / "store").glob("OPTIONS-*"))
    assert "filter_policy=bloomfilter" in settings
