"""The shard replica against the real broker: every partition of the sharded entities'
changelogs copied into a local RocksDB, deletes (tombstones) applied in log order, and a
restart resuming from the offsets stored with the data instead of reading the topics again."""

from __future__ import annotations

import time

import pytest
from confluent_kafka.admin import AdminClient, NewTopic

from streams.kafka.io import make_producer
from detectors.worker_state import shard_key
from streams.state import ShardReplica

pytestmark = pytest.mark.integration


def _changelogs(settings) -> dict[str, str]:
    topics = {"ip": f"{settings.app_id}-ip-state-changelog", "device": f"{settings.app_id}-device-state-changelog"}
    admin = AdminClient({"bootstrap.servers": settings.bootstrap_servers})
    for future in admin.create_topics([NewTopic(t, 2, 1) for t in topics.values()]).values():
        future.result(30)
    return topics


def _write(settings, records: list[tuple[str, int, bytes, bytes | None]]) -> None:
    producer = make_producer(settings)
    for topic, partition, key, value in records:
        producer.produce(topic, value, key, partition)
    assert producer.flush(30) == 0


def _replicated(replica: ShardReplica) -> int:
    applied, deadline = 0, time.monotonic() + 30
    while not replica.stats.caught_up:
        assert time.monotonic() < deadline, "the replica did not catch up"
        applied += replica.poll()
        time.sleep(0.01)
    return applied


def test_replica_applies_puts_and_tombstones_in_log_order_and_resumes_after_a_restart(settings, tmp_path):
    changelogs = _changelogs(settings)
    ip, device = changelogs["ip"], changelogs["device"]
    _write(settings, [
        (ip, 0, shard_key(0, "1.2.3.4"), b'{"l":1}'),
        (ip, 1, shard_key(1, "1.2.3.4"), b'{"l":2}'),
        (ip, 0, shard_key(0, "5.6.7.8"), b'{"l":3}'),
        (ip, 0, shard_key(0, "5.6.7.8"), None),  # deleted after its put, in the same poll
        (ip, 1, shard_key(1, "9.9.9.9"), None),
        (ip, 1, shard_key(1, "9.9.9.9"), b'{"l":4}'),  # written again after its tombstone
        (device, 0, shard_key(0, "d1"), b'{"l":5}'),
        (ip, 0, shard_key(0, "1.2.3.4"), b'{"l":6}'),  # the newest write wins
    ])
    path = tmp_path / "replica"
    replica = ShardReplica(settings.bootstrap_servers, changelogs, 2, path)
    assert _replicated(replica) == 8
    assert replica.shard_map("ip", "1.2.3.4") == {0: b'{"l":6}', 1: b'{"l":2}'}
    assert replica.shard_map("ip", "5.6.7.8") == {}
    assert replica.shards("ip", "9.9.9.9", [0, 1]) == (b'{"l":4}',)
    assert replica.shards("device", "d1", [1]) == ()  # only the partitions asked for
    assert replica.shards("device", "d1", [0, 1]) == (b'{"l":5}',)
    replica.close()

    _write(settings, [(device, 1, shard_key(1, "d1"), b'{"l":7}')])
    restarted = ShardReplica(settings.bootstrap_servers, changelogs, 2, path)
    assert _replicated(restarted) == 1  # the new record only: the others' offsets were stored with them
    assert restarted.shard_map("device", "d1") == {0: b'{"l":5}', 1: b'{"l":7}'}
    assert restarted.shard_map("ip", "1.2.3.4") == {0: b'{"l":6}', 1: b'{"l":2}'}
    restarted.close()


def test_replica_skips_the_partitions_the_worker_owns_and_copies_one_it_gives_up_from_its_store(settings, tmp_path):
    changelogs = _changelogs(settings)
    ip = changelogs["ip"]
    _write(settings, [
        (ip, 0, shard_key(0, "1.1.1.1"), b'{"l":1}'),
        (ip, 1, shard_key(1, "1.1.1.1"), b'{"l":2}'),
        (ip, 1, shard_key(1, "2.2.2.2"), b'{"l":3}'),
    ])
    path = tmp_path / "replica"
    replica = ShardReplica(settings.bootstrap_servers, changelogs, 2, path)
    assert _replicated(replica) == 3

    def unused(entity, partition):
        raise AssertionError("no partition was given up")

    replica.own({1}, unused)  # this worker owns partition 1 now: its writes are not read back
    assert replica.followed == [0]
    _write(settings, [
        (ip, 1, shard_key(1, "1.1.1.1"), b'{"l":4}'),
        (ip, 1, shard_key(1, "2.2.2.2"), None),  # swept by this worker while it owned the partition
        (ip, 0, shard_key(0, "1.1.1.1"), b'{"l":5}'),
    ])
    deadline = time.monotonic() + 30
    while replica.shard_map("ip", "1.1.1.1").get(0) != b'{"l":5}':
        assert time.monotonic() < deadline, "partition 0 was not replicated"
        replica.poll()
        time.sleep(0.01)
    assert replica.stats.applied == 4  # partition 1's two new records were never applied
    assert replica.shard_map("ip", "1.1.1.1") == {0: b'{"l":5}'}  # the owned partition is not served

    # The worker gives partition 1 up: the replica takes its rows from the worker's store (the
    # tombstoned key is gone from it) and follows the changelog from where that store is.
    store = {shard_key(1, "1.1.1.1"): b'{"l":4}', shard_key(1, "3.3.3.3"): b'{"l":6}'}
    copied = []

    def local(entity, partition):
        copied.append((entity, partition))
        # partition 1 of the ip changelog holds offsets 0 to 3: the store has everything up to 3
        return (list(store.items()) if entity == "ip" else []), (3 if entity == "ip" else None)

    replica.own(set(), local)
    assert sorted(copied) == [("device", 1), ("ip", 1)] and replica.followed == [0, 1]
    assert replica.shard_map("ip", "1.1.1.1") == {0: b'{"l":5}', 1: b'{"l":4}'}
    assert replica.shard_map("ip", "2.2.2.2") == {}  # the stale replicated row went with the copy
    assert replica.shards("ip", "3.3.3.3", [1]) == (b'{"l":6}',)
    _write(settings, [(ip, 1, shard_key(1, "2.2.2.2"), b'{"l":7}')])  # written by the next owner
    applied_before = replica.stats.applied
    deadline = time.monotonic() + 30
    while replica.shards("ip", "2.2.2.2", [1]) != (b'{"l":7}',):
        assert time.monotonic() < deadline, "partition 1 was not followed from the store's offset"
        replica.poll()
        time.sleep(0.01)
    assert replica.stats.applied - applied_before == 1  # from offset 4 on: nothing read twice
    replica.own({0}, unused)
    replica.close()

    restarted = ShardReplica(settings.bootstrap_servers, changelogs, 2, path)
    assert restarted.followed == [1]  # the owned partitions are kept with the data
    assert _replicated(restarted) == 0
    assert restarted.shard_map("ip", "1.1.1.1") == {1: b'{"l":4}'}
    restarted.close()
