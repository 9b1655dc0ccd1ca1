"""What an event reads of its entities' state (detectors/worker_state.py EntityReads): the batch's
changes first, then the records held until written, then the bytes the store was last read or
written with, and only then the store; a sharded entity's other shards from the owned stores
that hold one, and from the replica for the partitions not owned."""

from __future__ import annotations

import orjson

from detectors.worker_state import EntityReads, KeptPerEntity, shard_key


class Stores:
    """Table partitions as dicts, counting the reads of each."""

    def __init__(self, rows: dict[tuple[str, int], dict[bytes, bytes]]):
        self.rows = rows
        self.reads: list[tuple[str, int, bytes]] = []

    def of(self, entity: str, partition: int):
        def get(key: bytes) -> bytes | None:
            self.reads.append((entity, partition, key))
            return self.rows.setdefault((entity, partition), {}).get(key)
        return get


def reads_over(stores: Stores, replica=lambda entity, key, partitions: (), reputation=lambda entity, key: None):
    reads = EntityReads(stores.of, replica, reputation, partitions=4, interval_s=1.0)
    reads.begin_batch({0, 1})
    return reads


def test_a_record_is_read_from_the_batch_then_the_held_then_the_kept_bytes_then_the_store():
    stores = Stores({("user", 0): {b"u1": b'{"l":1}'}})
    reads = reads_over(stores)
    assert reads.states_for({"user": "u1"}, 0)["user"].record == {"l": 1}
    assert stores.reads == [("user", 0, b"u1")]
    reads.states_for({"user": "u1"}, 0)
    assert len(stores.reads) == 1, "the bytes read are kept: no second store read"

    record = reads.states_for({"user": "u1"}, 0)["user"].record
    record["l"] = 2
    reads.hold("user", 0, "u1", record, offset=5)
    assert reads.states_for({"user": "u1"}, 0)["user"].record is record, "the batch's change, the very object"
    reads.end_batch()
    assert reads.held.get(("user", b"u1")) == b'{"l":2}'
    assert reads.states_for({"user": "u1"}, 0)["user"].record == {"l": 2}, "held, not as stored"

    written = reads.held.take_all()
    for (entity, key), raw, _ in written:
        stores.rows[("user", 0)][key] = raw
        reads.written(entity, key, raw)
    assert reads.states_for({"user": "u1"}, 0)["user"].record == {"l": 2}
    assert len(stores.reads) == 1


def test_a_deleted_or_forgotten_record_is_read_from_the_store_again():
    stores = Stores({("user", 0): {b"u1": b'{"l":1}'}})
    reads = reads_over(stores)
    reads.states_for({"user": "u1"}, 0)
    del stores.rows[("user", 0)][b"u1"]
    reads.deleted("user", b"u1")
    assert reads.states_for({"user": "u1"}, 0)["user"].record is None
    stores.rows[("user", 0)][b"u1"] = b'{"l":3}'  # restored from the changelog by a new owner
    reads.forget_owned_stores()
    assert reads.states_for({"user": "u1"}, 0)["user"].record == {"l": 3}
    assert len(stores.reads) == 3


def test_a_sharded_entity_reads_its_owned_shards_that_exist_and_the_replica_for_the_rest():
    ip = "1.2.3.4"
    stores = Stores({("ip", 0): {shard_key(0, ip): b'{"l":1}'}, ("ip", 1): {}})
    asked = []

    def replica(entity, key, partitions):
        asked.append((entity, key, list(partitions)))
        return (b'{"l":9}',)

    reads = reads_over(stores, replica=replica, reputation=lambda entity, key: b"rep-" + key.encode())
    state = reads.states_for({"ip": ip}, 1)["ip"]
    assert state.record is None and state.reputation == b"rep-1.2.3.4"
    assert state.others == (b'{"l":9}', {"l": 1}), "the replica's bytes, then the owned shards decoded"
    assert asked == [("ip", ip, [2, 3])], "the partitions not owned"

    stores.reads.clear()
    reads.states_for({"ip": ip}, 1)
    assert stores.reads == [], "partition 1 holds no shard, partition 0's bytes are kept"

    record = {"l": 2}
    reads.hold("ip", 1, ip, record, offset=3)  # the worker writes a shard in partition 1
    assert reads.states_for({"ip": ip}, 0)["ip"].others == (b'{"l":9}', {"l": 2})
    assert reads.is_held(("ip", shard_key(1, ip)))


def test_owned_partitions_without_a_shard_are_read_once_to_find_out_then_never():
    ip = "1.2.3.4"
    stores = Stores({("ip", 0): {shard_key(0, ip): b'{"l":1}'}})
    reads = reads_over(stores)
    reads.begin_batch({0, 1, 2})
    for _ in range(3):
        assert reads.states_for({"ip": ip}, 1)["ip"].others == ({"l": 1},)
    assert [key for entity, p, key in stores.reads if p == 2] == [shard_key(2, ip)]


def test_a_batch_after_a_rebalance_reads_the_partitions_owned_then():
    stores = Stores({})
    asked = []
    reads = reads_over(stores, replica=lambda entity, key, partitions: asked.append(list(partitions)) or ())
    reads.states_for({"device": "d1"}, 0)
    reads.forget_owned_stores()  # as the worker does whenever partitions move
    reads.begin_batch({0, 1, 2, 3})
    reads.states_for({"device": "d1"}, 0)
    assert asked == [[2, 3]], "owning every partition, the replica has none to read: not asked"
    assert {(entity, p) for entity, p, _ in stores.reads} == {("device", 0), ("device", 1), ("device", 2), ("device", 3)}


def test_records_are_held_encoded_as_the_store_keeps_them():
    reads = reads_over(Stores({}))
    record = {"f": 1, "l": 2, "r": {}, "d": {}, "t": []}
    reads.hold("user", 0, "u1", record, offset=1)
    reads.end_batch()
    assert orjson.loads(reads.held.get(("user", b"u1"))) == record
    assert reads.held.unwritten_from() == {0: 1}


def test_reputations_kept_are_read_first_and_the_reader_asked_only_for_the_others():
    kept = KeptPerEntity(capacity=10)
    kept.put("user", "u1", b"rep-u1")
    kept.put("ip", "1.2.3.4", None)  # known to have none
    asked = []

    def reputation_of(entity, key):
        asked.append((entity, key))
        return b"read-" + key.encode()

    reads = EntityReads(Stores({}).of, lambda entity, key, partitions: (), reputation_of, partitions=4,
                        interval_s=1.0, reputations_kept=kept)
    reads.begin_batch({0, 1})
    states = reads.states_for({"user": "u1", "ip": "1.2.3.4", "device": "d1"}, 0)
    assert [states[name].reputation for name in ("user", "ip", "device")] == [b"rep-u1", None, b"read-d1"]
    assert asked == [("device", "d1")]


def test_an_event_is_extracted_over_the_states_it_reads_and_its_changed_records_are_held():
    from detectors.features import entity_keys, extract

    stores = Stores({})
    reads = reads_over(stores)
    event = {"event_id": "e1", "type": "login", "ts": 60_000, "user_id": "u1", "ip": "1.2.3.4", "success": True}
    states, extraction = reads.extract(event, 0, 41)
    assert set(states) == set(entity_keys(event)) == set(extraction.records)
    assert extraction.features == extract(event, {}).features, "what extract gives over no state"
    assert extraction.keys == entity_keys(event)
    user = extraction.records["user"]
    assert user["o"] == [0, 41], "the input it applied"
    assert reads.states_for({"user": "u1"}, 0)["user"].record is user, "held: the batch's next event reads it"
    reads.end_batch()
    assert reads.held.unwritten_from() == {0: 41}
    _, repeated = reads.extract(event, 0, 41)  # redelivered: scored again, counted once
    assert repeated.records == {} and repeated.features["user_logins_1h"] == extraction.features["user_logins_1h"] == 1
