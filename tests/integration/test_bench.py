"""The bench's latency load on the real broker: (b'') offers labels among the events, to the
labels topic, and times the events only."""

from __future__ import annotations

from typing import NamedTuple

import pytest

from streams import bench
from streams.kafka.io import topic_size
from streams.soak import soak
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


def test_a_soak_reports_every_window_of_its_load_and_scores_every_event(settings, kafka, tmp_path):
    lines: list[str] = []

    result = soak(settings, rate=200.0, seconds=4.0, window_s=2.0, log_dir=tmp_path,
                  broker_pid=kafka.status().pid, report=lines.append)

    assert [len(w.latencies_ms) for w in result.windows] == [400, 400]  # by when each event was produced
    assert (result.produced, result.unscored) == (800, 0)
    assert result.labels > 0 and topic_size(settings, settings.labels_topic) == result.labels
    assert all(0 <= ms < 10_000 for w in result.windows for ms in w.latencies_ms)
    assert all(w.cpu_s["scoring thread"] > 0 and w.cpu_s["broker"] > 0 for w in result.windows)
    assert lines[-1] == result.line() and lines[-1].startswith("SOAK rate=200 seconds=4 ")
    assert len([line for line in lines if line.strip().split(" ")[0] in ("0", "2")]) == 2  # a row per window
