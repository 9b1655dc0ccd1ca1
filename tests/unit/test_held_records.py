"""When the worker writes the entity records events changed (detectors/worker_state.py HeldRecords), how
far its periodic commits go meanwhile, and how a batch's changes are held (BatchChanges).

Times are multiples of 1/16 s, exact as floats."""

from __future__ import annotations

import orjson

from detectors.features import EntityState, encode_record, extract
from detectors.worker_state import BatchChanges, HeldRecords
from streams.follower import AssignedSource


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def written(held: HeldRecords) -> list[bytes]:
    return [key for (_, key), _, _ in held.take_due()]


def test_a_record_changed_by_every_event_is_written_once_per_interval_and_never_later():
    clock = Clock()
    held = HeldRecords(interval_s=0.5, round_s=0.125, clock=clock)
    writes: list[float] = []
    for step in range(1, 33):  # an event every 1/16 s for 2 s, a write round looked for after each
        clock.now = step / 16
        if ("ip", b"hot") not in held:
            first_held = clock.now
        held.hold(("ip", b"hot"), b'{"events":%d}' % step, 0, offset=step)
        for (_, key), record, _ in held.take_due():
            writes.append(clock.now)
            assert clock.now - first_held <= 0.5  # never held longer than the interval
            assert record == b'{"events":%d}' % step  # the record as the last event left it
    assert writes == [0.5, 1.0, 1.5, 2.0]  # one write per interval, not one per event or per round


def test_a_round_writes_the_records_due_and_keeps_the_ones_changed_since():
    clock = Clock()
    held = HeldRecords(interval_s=0.5, round_s=0.125, clock=clock)
    for i in range(10):  # one new entity every 1/8 s
        clock.now = i / 8
        held.hold(("user", b"u%d" % i), b"{}", i % 4, offset=i)
    held.hold(("user", b"u0"), b'{"changed":true}', 0, offset=10)  # changed again: still held since 0
    clock.now = 1.25  # u0..u7 were held at least 0.375 s ago (0 .. 0.875)
    assert written(held) == [b"u0", b"u1", b"u2", b"u3", b"u4", b"u5", b"u6", b"u7"]
    assert len(held) == 2 and ("user", b"u7") not in held and ("user", b"u8") in held
    clock.now = 1.3125
    assert written(held) == []  # the next round comes 1/8 s after this one
    clock.now = 1.375
    assert written(held) == [b"u8"]
    assert [key for (_, key), _, _ in held.take_all()] == [b"u9"]
    assert len(held) == 0 and written(held) == []


def test_an_interval_no_longer_than_a_round_writes_everything_held_every_interval():
    clock = Clock()
    held = HeldRecords(interval_s=0.0625, round_s=0.125, clock=clock)
    clock.now = 0.0625
    held.hold(("user", b"a"), b"{}", 0, offset=0)
    assert written(held) == [b"a"]  # held for no time at all: the round writes it
    held.hold(("user", b"b"), b"{}", 0, offset=1)
    clock.now = 0.0625 + 0.03125
    assert written(held) == []
    assert held.get(("user", b"b")) == b"{}"
    clock.now = 0.125
    assert written(held) == [b"b"]
    assert held.get(("user", b"b")) is None


def test_commits_may_go_up_to_the_oldest_change_still_held_in_each_partition():
    """What the worker's periodic commit may commit without writing the held records first:
    per partition, the offset of the first event that changed a record still held, however
    often the record changed since; a partition whose records are all written has no limit."""
    clock = Clock()
    held = HeldRecords(interval_s=0.5, round_s=0.125, clock=clock)
    held.hold(("user", b"a"), b'{"n":1}', 0, offset=100)
    held.hold(("ip", b"0|1.2.3.4"), b'{"n":1}', 0, offset=101)
    held.hold(("user", b"b"), b'{"n":1}', 1, offset=40)
    clock.now = 0.25
    held.hold(("user", b"a"), b'{"n":2}', 0, offset=150)  # changed again: replaces the record, not its first offset
    held.hold(("user", b"c"), b'{"n":1}', 2, offset=7)
    assert held.unwritten_from() == {0: 100, 1: 40, 2: 7}
    assert held.get(("user", b"a")) == b'{"n":2}'
    clock.now = 0.5  # the first three are due; c (held at 0.25) is not
    assert sorted(written(held)) == [b"0|1.2.3.4", b"a", b"b"]
    assert held.unwritten_from() == {2: 7}
    held.hold(("user", b"a"), b'{"n":3}', 0, offset=160)  # changed after its write: held from its new change
    assert held.unwritten_from() == {2: 7, 0: 160}
    held.take_all()
    assert held.unwritten_from() == {}


def test_a_commit_stops_each_events_partition_before_its_oldest_held_change():
    source = AssignedSource.__new__(AssignedSource)  # its positions only: no app, no broker
    source.next_offset, source.committed = {0: 500, 1: 80, 2: 30}, {0: 100, 1: 80, 2: 10}
    assert source.uncommitted() == {0: 500, 2: 30}
    # partition 0's records hold changes from offset 420 on, partition 2's from 10 (committed already)
    assert source.uncommitted({0: 420, 2: 10, 3: 5}) == {0: 420}


def test_a_batch_changes_its_records_decoded_and_holds_each_encoded_once_at_its_end():
    """The batch's events read and change one decoded record per entity; the held bytes, written
    later, are what the last of them left, and the next batch decodes them afresh."""
    login = {"event_id": "e1", "type": "login", "ts": 1_767_000_000_000, "user_id": "u1", "ip": "10.0.0.1",
             "device_id": "d1", "success": False}
    held, changes, key = HeldRecords(interval_s=0.5), BatchChanges(), ("ip", b"10.0.0.1")

    def state() -> EntityState:  # as the worker reads a record: the batch's change, else the held bytes
        changed = changes.get(key)
        return EntityState(record=changed if changed is not None else orjson.loads(held.get(key) or b"null"))

    def batch(offsets: range) -> dict:
        for offset in offsets:
            event = dict(login, event_id=f"e{offset}", ts=login["ts"] + offset * 100)
            record = extract(event, {"ip": state()}, (0, offset)).records["ip"]
            assert offset == offsets[0] or record is changes.get(key)  # one object through the batch
            changes.change(key, record, 0, offset)
        assert key not in held or held.get(key) != encode_record(changes.get(key))  # the batch's changes: not held yet
        changes.hold_all(held)
        assert len(changes) == 0
        return orjson.loads(held.get(key))

    first = batch(range(1, 10))
    assert first["o"] == [0, 9] and held.unwritten_from() == {0: 1}
    second = batch(range(10, 20))
    assert second["o"] == [0, 19] and held.unwritten_from() == {0: 1}  # held since the first batch's first change
    one_batch = HeldRecords(interval_s=0.5)
    everything = BatchChanges()
    record = None
    for offset in range(1, 20):  # the same events in one batch: the same record
        event = dict(login, event_id=f"e{offset}", ts=login["ts"] + offset * 100)
        record = extract(event, {"ip": EntityState(record=record)}, (0, offset)).records["ip"]
        everything.change(key, record, 0, offset)
    everything.hold_all(one_batch)
    assert one_batch.get(key) == held.get(key)
