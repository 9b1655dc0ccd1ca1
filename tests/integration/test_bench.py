"""The bench's latency load on the real broker: (b'') offers labels among the events, to the
labels topic, and times the events only."""

from __future__ import annotations

from typing import NamedTuple

import pytest

from streams import bench
from streams.kafka.io import topic_size
from tests.integration.helpers import T0, as_record, benign_post, moderator_label, stuffing_login

pytestmark = pytest.mark.integration


class Offered(NamedTuple):  # what ``bench._latency`` reads of a simulator record
    kind: str
    key: bytes
    value: bytes
    event_id: str


def test_a_latency_load_with_labels_times_its_events_and_counts_the_labels_joined(settings, tmp_path):
    events = [stuffing_login(i, f"victim-{i % 40}") if i % 3 == 0 else benign_post(i, f"user-{i % 40}")
              for i in range(600)]
    records = [Offered("event", *as_record(e), e["event_id"]) for e in events]
    labelled = events[200:250]  # each label 100 events after its event
    for n, e in enumerate(labelled):
        key, value = moderator_label(e, T0 + 3_600_000)
        records.insert(300 + 3 * n, Offered("label", key, value, e["event_id"]))

    measured = bench._latency(settings, records, rate=300.0, log_dir=tmp_path, settle_s=0.0)

    assert len(measured.ms) == 400  # the events after the first 200, which connect the producer
    assert all(ms >= 0 for ms in measured.ms)
    assert (measured.labels, measured.examples) == (50, 50)
    assert topic_size(settings, settings.labels_topic) == 50
    assert topic_size(settings, settings.dead_letter_topic) == 0  # no label went to the events topic
