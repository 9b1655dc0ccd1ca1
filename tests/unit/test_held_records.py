"""When the worker writes the entity records events changed (streams/state.py HeldRecords), and how
far its periodic commits go meanwhile.

Times are multiples of 1/16 s, exact as floats."""

from __future__ import annotations

import gc

import orjson
import pytest

import detectors
from detectors.features import EntityState, encode_record, extract
from streams.follower import AssignedSource
from streams.state import HeldRecords


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
        held.hold(("ip", b"hot"), {"events": step}, 0, offset=step)
        for (_, key), record, _ in held.take_due():
            writes.append(clock.now)
            assert clock.now - first_held <= 0.5  # never held longer than the interval
            assert record == {"events": step}  # the record as the last event left it
    assert writes == [0.5, 1.0, 1.5, 2.0]  # one write per interval, not one per event or per round


def test_a_round_writes_the_records_due_and_keeps_the_ones_changed_since():
    clock = Clock()
    held = HeldRecords(interval_s=0.5, round_s=0.125, clock=clock)
    for i in range(10):  # one new entity every 1/8 s
        clock.now = i / 8
        held.hold(("user", b"u%d" % i), {}, i % 4, offset=i)
    held.hold(("user", b"u0"), {"changed": True}, 0, offset=10)  # changed again: still held since 0
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
    held.hold(("user", b"a"), {}, 0, offset=0)
    assert written(held) == [b"a"]  # held for no time at all: the round writes it
    held.hold(("user", b"b"), {}, 0, offset=1)
    clock.now = 0.0625 + 0.03125
    assert written(held) == []
    assert held.get(("user", b"b")) == {}
    clock.now = 0.125
    assert written(held) == [b"b"]
    assert held.get(("user", b"b")) is None


def test_commits_may_go_up_to_the_oldest_change_still_held_in_each_partition():
    """What the worker's periodic commit may commit without writing the held records first:
    per partition, the offset of the first event that changed a record still held, however
    often the record changed since; a partition whose records are all written has no limit."""
    clock = Clock()
    held = HeldRecords(interval_s=0.5, round_s=0.125, clock=clock)
    held.hold(("user", b"a"), {"n": 1}, 0, offset=100)
    held.hold(("ip", b"0|1.2.3.4"), {"n": 1}, 0, offset=101)
    held.hold(("user", b"b"), {"n": 1}, 1, offset=40)
    clock.now = 0.25
    record = {"n": 2}
    held.hold(("user", b"a"), record, 0, offset=150)  # a new object: replaces the record, not its first offset
    held.hold(("user", b"a"), record, 0, offset=151)  # changed in place
    held.hold(("user", b"c"), {"n": 1}, 2, offset=7)
    assert held.unwritten_from() == {0: 100, 1: 40, 2: 7}
    assert held.get(("user", b"a")) is record
    clock.now = 0.5  # the first three are due; c (held at 0.25) is not
    assert sorted(written(held)) == [b"0|1.2.3.4", b"a", b"b"]
    assert held.unwritten_from() == {2: 7}
    held.hold(("user", b"a"), {"n": 3}, 0, offset=160)  # changed after its write: held from its new change
    assert held.unwritten_from() == {2: 7, 0: 160}
    held.take_all()
    assert held.unwritten_from() == {}


def test_a_commit_stops_each_events_partition_before_its_oldest_held_change():
    source = AssignedSource.__new__(AssignedSource)  # its positions only: no app, no broker
    source.next_offset, source.committed = {0: 500, 1: 80, 2: 30}, {0: 100, 1: 80, 2: 10}
    assert source.uncommitted() == {0: 500, 2: 30}
    # partition 0's records hold changes from offset 420 on, partition 2's from 10 (committed already)
    assert source.uncommitted({0: 420, 2: 10, 3: 5}) == {0: 420}


def _containers(value: object) -> list[object]:
    if isinstance(value, dict):
        return [value, *(c for item in value.values() for c in _containers(item))]
    if isinstance(value, list):
        return [value, *(c for item in value for c in _containers(item))]
    return []


@pytest.mark.skipif(detectors.pure_python_requested(), reason="only the compiled build can untrack")
def test_held_records_stay_out_of_the_cyclic_collector_while_events_change_them():
    """The young collections scanned every held record's containers (15-19 ms at 5,000 events/s,
    docs/performance.md round 25): a record held leaves the collector, and the next events
    counted in its buckets do not bring it back (a new bucket is a new, tracked list)."""
    assert "acyclic" in detectors.compiled_modules(), "detectors are not compiled: run `make install`"
    login = {"event_id": "e1", "type": "login", "ts": 1_767_000_000_000, "user_id": "u1", "ip": "10.0.0.1",
             "device_id": "d1", "success": False}
    stored = encode_record(extract(login, {}, (0, 1)).records["ip"])  # as the store gives it back
    record = orjson.loads(stored)
    assert all(gc.is_tracked(c) for c in _containers(record) if isinstance(c, list))
    held = HeldRecords(interval_s=0.5)
    held.hold(("ip", b"10.0.0.1"), record, 0, offset=2)
    assert not any(gc.is_tracked(c) for c in _containers(record))
    for offset in range(3, 30):  # the same entity and user again, within their buckets: changed in place
        event = dict(login, event_id=f"e{offset}", ts=login["ts"] + offset * 100)
        extraction = extract(event, {"ip": EntityState(record=held.get(("ip", b"10.0.0.1")))}, (0, offset))
        assert extraction.records["ip"] is record and record["o"] == [0, offset]
        held.hold(("ip", b"10.0.0.1"), extraction.records["ip"], 0, offset)
    assert not any(gc.is_tracked(c) for c in _containers(record))
    replaced = orjson.loads(stored)
    held.hold(("ip", b"10.0.0.1"), replaced, 0, offset=31)  # a new object for a held key leaves it too
    assert not any(gc.is_tracked(c) for c in _containers(replaced))
