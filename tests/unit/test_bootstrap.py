"""Batch bootstrap: a scikit-learn fit on a labelled history, through the live feature
code, loaded into the online models as a warm start."""

from __future__ import annotations

import orjson
import pytest

from detectors.bootstrap import BootstrapError, bootstrap
from detectors.evaluation import evaluate
from detectors.lifecycle import ModelSet
from detectors.pipeline import Detector
from streams.simulator import SimulationConfig, run_simulation

HISTORY = SimulationConfig(seed=11, users=300, days=1.5, stuffing_per_day=4, fake_signup_bursts_per_day=4,
                           spam_bursts_per_day=4, card_testing_per_day=4, labels_after_end=True)
LIVE = SimulationConfig(seed=12, users=300, days=0.5, start_ms=HISTORY.start_ms + int(1.5 * 86_400_000),
                        stuffing_per_day=4, fake_signup_bursts_per_day=4, spam_bursts_per_day=4, card_testing_per_day=4)


def _files(config: SimulationConfig, out):
    run_simulation(config, out_dir=out)
    labels = {}
    for line in (out / "labels.jsonl").read_bytes().splitlines():
        label = orjson.loads(line)
        labels[label["event_id"]] = label
    truth = {}
    for line in (out / "truth-labels.jsonl").read_bytes().splitlines():
        label = orjson.loads(line)
        truth[label["event_id"]] = label
    return (out / "events.jsonl").read_bytes().splitlines(), labels, truth


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    return _files(HISTORY, tmp_path_factory.mktemp("history"))


@pytest.fixture(scope="module")
def warm(history):
    events, labels, _ = history
    return bootstrap(events, labels, holdout=0.25, min_labels_per_class=20)


def test_report_names_held_out_metrics_for_each_detector(warm):
    _, report = warm
    held_out = report["held_out"]
    assert report["train_events"] + held_out["events"] == report["labelled_events"]
    assert 0 < held_out["abusive"] < held_out["events"]
    assert held_out["sklearn_model"]["pr_auc"] > 0.8
    assert held_out["stacked_fusion"]["pr_auc"] > 0.8
    assert {"online_model", "online_anomaly", "online_rules", "online_content"} <= set(held_out)


def test_warm_start_is_ready_and_survives_a_checkpoint(warm):
    models, report = warm
    restored = ModelSet.from_bytes(models.to_bytes())
    assert restored.champion.ready and restored.challenger.ready and restored.fusion.ready
    assert restored.offset == -1  # the live training topic is applied from its start
    assert restored.bootstrap == report
    assert restored.champion.classifier.weights == models.champion.classifier.weights


def test_warm_start_scores_unseen_traffic_well_from_its_first_event(warm, tmp_path):
    """Another seed, later days, no live labels at all: only what the history taught."""
    models, _ = warm
    events, _, truth = _files(LIVE, tmp_path)
    cold = evaluate(events, truth, label_delay_ms=30 * 86_400_000).report()
    started = evaluate(events, truth, label_delay_ms=30 * 86_400_000,
                       detector=Detector(ModelSet.from_bytes(models.to_bytes()))).report()
    assert cold["training_examples"] == started["training_examples"] == 0
    assert started["overall"]["model"]["pr_auc"] > 0.8
    assert started["overall"]["fused"]["pr_auc"] > cold["overall"]["fused"]["pr_auc"] + 0.1
    assert started["alerts"]["precision"] >= 0.7 and started["alerts"]["recall"] >= 0.5


def test_a_history_without_enough_labels_is_refused_with_advice(history):
    events, labels, _ = history
    few = dict(list(labels.items())[:15])
    with pytest.raises(BootstrapError, match="longer history"):
        bootstrap(events, few)


def test_warm_start_forgets_the_optimizer_state_of_the_history_pass(warm):
    """Stale Adam moments would drag the fitted weights along the history's trajectory."""
    models, _ = warm
    for classifier in (models.champion.classifier, models.challenger.classifier, models.fusion.classifier):
        assert classifier.optimizer.n_iterations == 0
