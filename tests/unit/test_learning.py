"""Label join, online model and alert decisions."""

from __future__ import annotations

import pytest

from detectors.decisions import alert_id, build_alert, score_id, severity
from detectors.labels import on_label, on_score
from detectors.model import OnlineRiskModel
from detectors.pipeline import Detector, LocalStore

BAD = {"login_fail_1h": 8.0, "ip_new_for_user": 1.0, "login_failed": 1.0}
GOOD = {"login_fail_1h": 0.0, "ip_new_for_user": 0.0, "login_failed": 0.0}


def test_score_then_label_learns_once():
    pending, learn = on_score(None, BAD, ts=1)
    assert learn is None
    pending, learn = on_label(pending, "abuse")
    assert learn == (BAD, True)
    pending, learn = on_label(pending, "abuse")
    assert learn is None


def test_label_before_score_is_kept_until_the_score_arrives():
    pending, learn = on_label(None, "benign")
    assert learn is None and pending["y"] == "benign"
    pending, learn = on_score(pending, GOOD, ts=1)
    assert learn == (GOOD, False)


def test_appeal_overturning_a_label_is_learned_as_a_correction():
    pending, _ = on_score(None, BAD, ts=1)
    pending, first = on_label(pending, "abuse")
    pending, correction = on_label(pending, "benign")
    assert first == (BAD, True) and correction == (BAD, False)


def test_model_needs_labels_of_both_classes_before_it_is_ready():
    model = OnlineRiskModel(min_labels_per_class=2)
    for _ in range(5):
        model.learn_one(BAD, True)
    assert not model.ready
    model.learn_one(GOOD, False)
    model.learn_one(GOOD, False)
    assert model.ready and model.version.endswith("+7")


def test_model_learns_a_separable_pattern_despite_imbalance():
    model = OnlineRiskModel(min_labels_per_class=1)
    for i in range(400):
        model.observe(GOOD)
        model.learn_one(GOOD, False)
        if i % 20 == 0:  # 1 positive per 20 negatives
            model.observe(BAD)
            model.learn_one(BAD, True)
    assert model.predict_proba_one(BAD) > 0.8
    assert model.predict_proba_one(GOOD) < 0.2
    reasons = model.explain_one(BAD)
    assert reasons and all(r["weight"] > 0 for r in reasons)
    assert {r["code"] for r in reasons} <= set(BAD)


def test_detector_alerts_only_when_ready_and_over_threshold():
    detector = Detector(OnlineRiskModel(min_labels_per_class=1), alert_threshold=0.7)
    event = {"event_id": "e1", "type": "login", "ts": 0, "user_id": "u", "ip": "9.9.9.9", "success": False}
    benign = {"event_id": "b", "type": "login", "ts": 0, "user_id": "w", "success": True}
    cold = detector.score(event, {}, now_ms=5)
    assert cold.alert is None and not cold.risk_score["model_ready"]
    for i in range(200):
        bad = detector.score(dict(event, event_id=f"x{i}"), {}, now_ms=5).risk_score["features"]
        good = detector.score(dict(benign, event_id=f"y{i}"), {}, now_ms=5).risk_score["features"]
        detector.learn(bad, True)
        detector.learn(good, False)
    warm = detector.score(dict(event, event_id="e2", user_id="v"), {}, now_ms=6)
    assert warm.alert is not None
    assert warm.alert["alert_id"] == alert_id("e2")
    assert warm.alert["evidence_event_ids"] == ["e2"]
    assert warm.risk_score["score_id"] == score_id("e2")


def test_ids_are_derived_from_the_event():
    assert alert_id("e") == alert_id("e") and alert_id("e") != alert_id("f")
    assert score_id("e") != alert_id("e")


@pytest.mark.parametrize("score, expected", [(0.8, "medium"), (0.87, "high"), (0.94, "critical"), (1.0, "critical")])
def test_severity_bands(score, expected):
    assert severity(score, threshold=0.8) == expected


def test_alert_carries_what_enforcement_needs():
    score = {"event_id": "e9", "event_type": "payment", "user_id": "u9", "ts": 3, "score": 0.99,
             "reasons": [{"code": "x", "text": "x: 1", "weight": 1.0, "value": 1.0}], "model_version": "m/1+3"}
    alert = build_alert(score, threshold=0.8, now_ms=10)
    assert alert["entity"] == "user:u9" and alert["severity"] == "critical" and alert["reasons"]
