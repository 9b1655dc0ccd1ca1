"""The detector: one valid event and its entities' state in, a score (and maybe an alert) out.

This is the code the live worker, tests and offline tools all run; it knows
nothing about Kafka or Faust. State crosses the boundary as bytes so the
worker stores exactly what the detector wrote.

>>> d = Detector(OnlineRiskModel(min_labels_per_class=1), alert_threshold=0.8)
>>> out = d.score({"event_id": "e1", "type": "signup", "ts": 0, "user_id": "u1",
...                "schema_version": 1}, {}, now_ms=1)
>>> 0.0 <= out.risk_score["score"] <= 1.0, out.alert is None, list(out.updates)
(True, True, ['user'])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from detectors.decisions import build_alert, score_id
from detectors.features import EntityState, entity_keys, extract
from detectors.model import OnlineRiskModel


@dataclass(frozen=True)
class Scored:
    updates: dict[str, bytes]  # entity name -> new bytes of the shard this event wrote
    keys: dict[str, str]  # entity name -> key
    risk_score: dict[str, Any]
    alert: dict[str, Any] | None


class Detector:
    def __init__(self, model: OnlineRiskModel, alert_threshold: float):
        self.model = model
        self.alert_threshold = alert_threshold

    def score(
        self, event: dict[str, Any], states: Mapping[str, EntityState], now_ms: int,
        source: tuple[int, int] | None = None,
    ) -> Scored:
        """``source`` (partition, offset) makes state updates idempotent under redelivery."""
        extraction = extract(event, states, source)
        features = extraction.features
        self.model.observe(features)
        probability = self.model.predict_proba_one(features)
        ready = self.model.ready
        risk_score = {
            "schema_version": 1,
            "score_id": score_id(event["event_id"]),
            "event_id": event["event_id"],
            "event_type": event["type"],
            "user_id": event["user_id"],
            "ts": event["ts"],
            "scored_at": now_ms,
            "score": round(min(1.0, max(0.0, probability)), 6),
            "model_version": self.model.version,
            "model_ready": ready,
            "reasons": self.model.explain_one(features) if ready else [],
            "features": features,
        }
        alert = None
        if ready and risk_score["score"] >= self.alert_threshold:
            alert = build_alert(risk_score, self.alert_threshold, now_ms)
        return Scored(extraction.updates, extraction.keys, risk_score, alert)

    def learn(self, features: dict[str, float], is_abuse: bool) -> None:
        self.model.learn_one(features, is_abuse)


class LocalStore:
    """All entity state in one process, one shard per entity: what offline
    evaluation, replay checks and tests use around the same ``Detector``."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, str], bytes] = {}

    def score(self, detector: Detector, event: dict[str, Any], now_ms: int) -> Scored:
        keys = entity_keys(event)
        scored = detector.score(event, {k: EntityState(self.records.get((k, v))) for k, v in keys.items()}, now_ms)
        for name, raw in scored.updates.items():
            self.records[(name, keys[name])] = raw
        return scored
