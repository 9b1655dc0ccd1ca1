"""Scoring in batches gives exactly what scoring one event at a time gives."""

from __future__ import annotations

import random

import numpy as np
import orjson
import pytest
from river import anomaly

from detectors.anomaly import ANOMALY_FEATURES, AnomalyModel
from detectors.catalog import FEATURE_NAMES
from detectors.evaluation import evaluate
from detectors.events import decode_event, decode_label
from detectors.features import EntityState, encode_record, entity_keys, extract
from detectors.labels import on_label, on_score
from detectors.lifecycle import ModelSet
from detectors.model import log_feature_matrix
from detectors.pipeline import Detector, LocalStore, Scored
from streams.simulator import SimulationConfig, simulate

CONFIG = SimulationConfig(seed=3, users=150, days=0.5, stuffing_per_day=6, fake_signup_bursts_per_day=6,
                          spam_bursts_per_day=6, card_testing_per_day=6)


@pytest.fixture(scope="module")
def stream():
    return [r for r in simulate(CONFIG) if r.kind in ("event", "label")]


def _random_rows(rng: random.Random, n: int) -> list[dict[str, float]]:
    rows = []
    for i in range(n):
        burst = i % 97 == 0  # now and then far from the rest
        rows.append({name: rng.expovariate(0.02 if burst else 1.0) for name in ANOMALY_FEATURES})
    return rows


def test_anomaly_model_scores_exactly_as_rivers_half_space_trees_in_any_batches():
    rng = random.Random(1)
    rows = _random_rows(rng, 1400)
    river_trees = anomaly.HalfSpaceTrees(n_trees=10, height=8, window_size=250, seed=42)
    ours = AnomalyModel(seed=42)
    expected = []
    for i, row in enumerate(rows):
        inputs = dict(zip(ANOMALY_FEATURES, AnomalyModel.inputs_many(log_feature_matrix([row]))[0].tolist()))
        expected.append(river_trees.score_one(inputs) if i >= 500 else 0.0)  # scores start after two windows
        river_trees.learn_one(inputs)
    got, start = [], 0
    for size in [1, 7, 9, 250, 300, 3, 1] * 100:  # batches across window ends, one row and many
        if start >= len(rows):
            break
        got.extend(ours.score_then_learn_many(log_feature_matrix(rows[start:start + size])).tolist())
        start += size
    assert len(got) == len(rows) and any(s > 0 for s in got)
    assert got == expected


def _score_keeping_records_decoded(detector: Detector, store: LocalStore, events: list[dict]) -> list[Scored]:
    """``store.score_many`` as the live worker keeps state: the batch's records decoded,
    updated in place event after event, encoded once when the batch ends."""
    kept: dict[tuple[str, str], dict] = {}
    batch = []
    for event in events:
        keys = entity_keys(event)
        states = {name: EntityState(None if (name, key) in kept else store.records.get((name, key)),
                                    reputation=store.reputation.get((name, key)), record=kept.get((name, key)))
                  for name, key in keys.items()}
        extraction = extract(event, states)
        for name, record in extraction.records.items():
            kept[(name, keys[name])] = record
        batch.append((event, states, extraction))
    scored = detector.score_many(batch, now_ms=None, with_json=True)  # as the worker asks
    for (_, _, extraction), result in zip(batch, scored):
        # made as each event was decided: what its dicts held then, as the worker sends them
        assert result.risk_score_json == orjson.dumps(result.risk_score)
        assert result.alert_json == (None if result.alert is None else orjson.dumps(result.alert))
        for name, record in result.records.items():
            if name in extraction.records:  # the worker keeps these once, at extraction: the same objects
                assert record is extraction.records[name]
            else:
                kept[(name, result.keys[name])] = record
    for key, record in kept.items():
        store.records[key] = encode_record(record)
    return scored


def _run(stream, sizes: list[int], batched: bool, keep_decoded: bool = False,
         final_records: dict | None = None) -> list[bytes]:
    """Scores the stream in segments of the given sizes, learning the labels that came
    during a segment after it: each segment in one batch, or one event at a time.
    Records kept decoded through a batch have no bytes per event: only scores and alerts are compared."""
    detector = Detector(ModelSet.new(min_labels_per_class=5))
    store = LocalStore()
    pending: dict = {}
    outputs: list[bytes] = []
    segment: list[dict] = []
    labels: list[dict] = []
    sizes_left = iter(sizes)
    size = next(sizes_left)
    offset = 0

    def score(events: list[dict]) -> None:
        if keep_decoded:
            results = _score_keeping_records_decoded(detector, store, events)
        else:
            results = store.score_many(detector, events, now_ms=None)
        for scored in results:
            assert keep_decoded or scored.risk_score_json is scored.alert_json is None  # only when asked
            updates = [] if keep_decoded else sorted((k, v.decode()) for k, v in scored.updates.items())
            outputs.append(orjson.dumps([scored.risk_score, scored.alert, updates]))
            event_id = scored.risk_score["event_id"]
            # the live join reads the score's JSON back (with_json's text counts are JSON only)
            joined = orjson.loads(scored.risk_score_json) if keep_decoded else scored.risk_score
            pending[event_id], _ = on_score(pending.get(event_id), joined)

    def end_segment() -> None:
        nonlocal offset
        if batched:
            score(segment)
        else:
            for event in segment:
                score([event])
        segment.clear()
        for label in labels:
            pending[label["event_id"]], example = on_label(pending.get(label["event_id"]), label)
            if example is not None:
                store.learn(detector, example, offset)
                offset += 1
        labels.clear()
        if final_records is not None:
            final_records.update(store.records)

    for record in stream:
        if record.kind == "label":
            labels.append(decode_label(record.value, 1 << 20))
            continue
        segment.append(decode_event(record.value, 1 << 20))
        if len(segment) >= size:
            end_segment()
            size = next(sizes_left, 1000)
    end_segment()
    return outputs


def test_batches_score_like_one_event_at_a_time(stream):
    sizes = [random.Random(2).choice([1, 2, 5, 40, 300, 1000]) for _ in range(200)]
    one_at_a_time = _run(stream, sizes, batched=False)
    batched = _run(stream, sizes, batched=True)
    assert len(batched) == len(one_at_a_time) == sum(r.kind == "event" for r in stream)
    alerts = [orjson.loads(o)[1] for o in one_at_a_time if orjson.loads(o)[1] is not None]
    assert len(alerts) > 10
    ready = [orjson.loads(o)[0] for o in one_at_a_time if orjson.loads(o)[0]["model_ready"]]
    assert ready and any(r["reasons"] for r in ready)
    assert batched == one_at_a_time


def test_records_kept_decoded_through_batches_score_and_store_what_bytes_do(stream):
    """The live worker's way (each batch's records decoded once, updated in place, encoded once)
    against the bytes-per-event way of offline evaluation and replay: the same scores, alerts
    and stored records."""
    sizes = [random.Random(4).choice([1, 3, 40, 300, 1000]) for _ in range(200)]
    stored_as_bytes: dict = {}
    kept_decoded: dict = {}
    per_event = [orjson.loads(o)[:2] for o in _run(stream, sizes, batched=True, final_records=stored_as_bytes)]
    live = [orjson.loads(o)[:2] for o in _run(stream, sizes, batched=True, keep_decoded=True,
                                               final_records=kept_decoded)]
    assert len(live) == sum(r.kind == "event" for r in stream)
    assert sum(alert is not None for _, alert in live) > 10
    assert live == per_event
    assert kept_decoded == stored_as_bytes


def test_evaluation_in_batches_sees_what_one_event_at_a_time_sees(stream, monkeypatch):
    events = [r.value for r in stream if r.kind == "event"]
    labels = {}
    for r in stream:
        if r.kind == "label":
            label = orjson.loads(r.value)
            labels[label["event_id"]] = label

    def run() -> list[bytes]:
        out: list[bytes] = []
        evaluate(events, labels, label_delay_ms=600_000,
                 on_score_record=lambda score, label, alerted: out.append(orjson.dumps([score, label, alerted])))
        return out

    batched = run()
    monkeypatch.setattr("detectors.evaluation.BATCH_EVENTS", 1)
    assert run() == batched


def test_a_feature_row_missing_catalogue_features_counts_them_as_zero():
    matrix = log_feature_matrix([{"user_events_1m": np.e - 1}, {name: 0.0 for name in FEATURE_NAMES}])
    assert matrix.shape == (2, len(FEATURE_NAMES))
    assert matrix[0, FEATURE_NAMES.index("user_events_1m")] == pytest.approx(1.0)
    assert matrix[0].sum() == pytest.approx(1.0) and not matrix[1].any()


def test_a_batch_the_detector_fails_on_costs_only_the_events_it_fails_on():
    from streams.app import score_isolating_failures

    class Fragile(Detector):
        def score_many(self, batch, now_ms, with_json=False):
            if any(event["event_id"] == "bad" for event, _, _ in batch):
                raise ValueError("a detector bug")
            return super().score_many(batch, now_ms, with_json)

    events = [{"event_id": event_id, "type": "signup", "ts": 0, "user_id": f"u-{event_id}", "schema_version": 1}
              for event_id in ("a", "bad", "c")]
    batch = [(event, {}, extract(event, {})) for event in events]
    results = score_isolating_failures(Fragile(ModelSet.new()), batch, now_ms=1)
    assert isinstance(results[1], ValueError)
    assert [r.risk_score["event_id"] for r in (results[0], results[2])] == ["a", "c"]
    assert all(r.risk_score_json == orjson.dumps(r.risk_score) for r in (results[0], results[2]))  # what it sends
