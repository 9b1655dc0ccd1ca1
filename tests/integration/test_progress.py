"""Every input offset scored: the broker reader behind the worker's gap filling, and
offset gaps that are real (transaction markers) accepted without refetching data."""

from __future__ import annotations

import uuid

import pytest

from streams.kafka.io import PartitionReader, make_producer
from tests.integration.helpers import T0, as_record, event, moderator_label

pytestmark = pytest.mark.integration


def _transactional_producer(settings):
    producer = make_producer(settings, **{"transactional.id": f"test-{uuid.uuid4().hex}"})
    producer.init_transactions(30)
    return producer


def _produce_in_transactions(producer, topic: str, batches: list[list[tuple[bytes, bytes]]], partition=None) -> None:
    for batch in batches:
        producer.begin_transaction()
        for key, value in batch:
            if partition is None:
                producer.produce(topic, key=key, value=value)
            else:
                producer.produce(topic, key=key, value=value, partition=partition)
        producer.commit_transaction(30)


def test_reader_returns_the_records_of_a_range_and_skips_transaction_markers(settings):
    producer = _transactional_producer(settings)
    batches = [[(b"k", f"v{t}-{i}".encode()) for i in range(3)] for t in range(2)]
    _produce_in_transactions(producer, settings.events_topic, batches, partition=0)
    reader = PartitionReader(settings, settings.events_topic, group_id=settings.app_id)
    try:
        # offsets: 0 1 2 (marker 3) 4 5 6 (marker 7)
        assert reader.end_offsets([0]) == {0: 8}
        assert reader.start_offsets([0]) == {0: 0}  # nothing committed: the log start
        everything = reader.read_range(0, 0, 8)
        assert [o for o, _, _ in everything] == [0, 1, 2, 4, 5, 6]
        assert [v for _, _, v in everything] == [v for batch in batches for _, v in batch]
        assert reader.read_range(0, 3, 4) == []  # a marker alone: a real gap
        assert [o for o, _, _ in reader.read_range(0, 2, 5)] == [2, 4]
        assert reader.read_range(0, 8, 9) == []  # past the end: returns at once
    finally:
        reader.close()


def test_worker_processes_every_event_and_label_across_transaction_markers(settings, worker, reader, produce):
    scores = reader(settings.scores_topic)
    examples = reader(settings.examples_topic)
    sent = [event(f"tx-{t}-{i}", "login", T0 + (t * 10 + i) * 1000, f"user-{i % 4}", success=True)
            for t in range(20) for i in range(5)]
    producer = _transactional_producer(settings)
    _produce_in_transactions(producer, settings.events_topic,
                             [[as_record(e) for e in sent[t * 5:(t + 1) * 5]] for t in range(20)])
    records = scores.wait_for(lambda r: {x[1]["event_id"] for x in r} >= {e["event_id"] for e in sent},
                              worker=worker)
    assert len({r[1]["event_id"] for r in records}) == len(sent)
    # Labels in transactions too: the label join sees the same kind of gaps.
    _produce_in_transactions(producer, settings.labels_topic,
                             [[moderator_label(e, e["ts"] + 60_000) for e in sent[t * 10:(t + 1) * 10]]
                              for t in range(10)])
    learned = examples.wait_for(lambda r: {x[1]["event_id"] for x in r} >= {e["event_id"] for e in sent},
                                worker=worker)
    assert len({r[1]["event_id"] for r in learned}) == len(sent)
    # Markers leave gaps in the offsets; the worker checks them with the broker and
    # finds no records there, so it reports no skipped records.
    assert "skipped" not in worker.log()
