"""The detector: one valid event and its entities' state in, a fused risk score
(and maybe an alert) out; one training example in, every model a little wiser.

This is the code the live worker, offline evaluation and tests all run; it
knows nothing about Kafka or Faust. State crosses the boundary as bytes so the
worker stores exactly what the detector wrote.

>>> d = Detector(ModelSet.new(min_labels_per_class=1))
>>> out = d.score({"event_id": "e1", "type": "signup", "ts": 0, "user_id": "u1",
...                "schema_version": 1}, {}, now_ms=1)
>>> 0.0 <= out.risk_score["score"] <= 1.0, out.alert is None, list(out.updates)
(True, True, ['user'])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Protocol

import orjson

from detectors.anomaly import AnomalyModel
from detectors.catalog import CONTENT_TYPES, ENTITIES
from detectors.content import text_inputs
from detectors.decisions import alert_id, build_alert, score_id, severity
from detectors.features import EntityState, entity_keys, extract
from detectors.lifecycle import ModelSet
from detectors.reputation import add_label_stored, label_deltas
from detectors.rules import RuleSet, load_rules

EVIDENCE_SHARE = 0.75  # events at 3/4 of the threshold are kept as evidence for the next alert
MAX_EVIDENCE = 10


class RulesSource(Protocol):
    rules: RuleSet


@dataclass
class StaticRules:
    rules: RuleSet


@dataclass(frozen=True)
class Scored:
    updates: dict[str, bytes]  # entity name -> new bytes of the shard this event wrote
    keys: dict[str, str]  # entity name -> key
    risk_score: dict[str, Any]
    alert: dict[str, Any] | None


@dataclass(frozen=True)
class ReputationDelta:
    entity: str
    key: str
    label_ts: int
    delta: int


class Detector:
    def __init__(self, models: ModelSet, rules: RulesSource | None = None, anomaly: AnomalyModel | None = None):
        self.models = models
        self.rules_source = rules or StaticRules(load_rules(None))
        self.anomaly = anomaly or AnomalyModel()

    # -- scoring ----------------------------------------------------------
    def score(
        self, event: dict[str, Any], states: Mapping[str, EntityState], now_ms: int,
        source: tuple[int, int] | None = None,
    ) -> Scored:
        """``source`` (partition, offset) makes state updates idempotent under redelivery."""
        extraction = extract(event, states, source)
        features = extraction.features
        models, rules = self.models, self.rules_source.rules
        champion = models.champion
        model_score, shadow_score, model_inputs = models.observe_and_score(features)
        has_text = event["type"] in CONTENT_TYPES
        text = text_inputs(event["text"]) if has_text else None
        matched = rules.matches(features, event["type"])
        scores = {
            "model": round(model_score, 6),
            "anomaly": round(self.anomaly.score_then_learn(features), 6),
            "rules": max((r.score for r in matched), default=0.0),
            "content": round(models.content.predict_proba_one(text), 6) if text else 0.0,
        }
        fused = models.fusion.fuse(scores, champion.ready, models.content.ready, has_text)
        risk_score = {
            "schema_version": 1,
            "score_id": score_id(event["event_id"]),
            "event_id": event["event_id"],
            "event_type": event["type"],
            "user_id": event["user_id"],
            "ts": event["ts"],
            "scored_at": now_ms,
            "score": round(min(1.0, max(0.0, fused)), 6),
            "model_version": champion.version,
            "model_ready": champion.ready,
            "rules_version": rules.version,
            "detectors": scores,
            "matched_rules": [r.name for r in matched],
            "shadow": {"model_version": models.challenger.version,
                       "score": round(shadow_score, 6)},
            "reasons": self._reasons(features, scores, matched, model_inputs),
            "entities": extraction.keys,
            "features": features,
        }
        if text is not None:
            risk_score["inputs"] = {"text": text}
        records = dict(extraction.records)
        alert = self._decide(event, risk_score, rules, states, records, now_ms)
        updates = {name: orjson.dumps(record) for name, record in records.items()}
        return Scored(updates, extraction.keys, risk_score, alert)

    def _reasons(self, features: dict[str, float], scores: dict[str, float], matched: list,
                 model_inputs: dict[str, float]) -> list[dict[str, Any]]:
        reasons: list[dict[str, Any]] = []
        for rule in matched:
            detail = "; ".join(c.describe(features) for c in rule.conditions)
            reasons.append({"code": f"rule:{rule.name}", "text": f"{rule.description} ({detail})",
                            "weight": rule.score, "value": None})
        if self.models.content.ready and scores["content"] >= 0.7:
            reasons.append({"code": "content", "text": f"text resembles confirmed abuse (content score {scores['content']:.2f})",
                            "weight": scores["content"], "value": scores["content"]})
        if self.models.champion.ready:
            reasons.extend(self.models.champion.explain_one(features, inputs=model_inputs))
        if scores["anomaly"] >= 0.7:
            reasons.append({"code": "anomaly", "text": f"activity unlike normal traffic (anomaly score {scores['anomaly']:.2f})",
                            "weight": scores["anomaly"], "value": scores["anomaly"]})
        return reasons[:5]

    def _decide(
        self, event: dict[str, Any], risk_score: dict[str, Any], rules: RuleSet,
        states: Mapping[str, EntityState], records: dict[str, dict], now_ms: int,
    ) -> dict[str, Any] | None:
        """The alert policy: per-type thresholds, one alert per account per cooldown,
        evidence from the account's recent high scores. Its state lives in the user record."""
        policy = rules.policy
        threshold = policy.threshold_for(event["type"])
        user = records.get("user")
        if user is None:  # a redelivered event: the record already applied it
            if "user" not in states or states["user"].own is None:
                return None
            user = orjson.loads(states["user"].own)
        state = user.get("a") or {"until": None, "id": None, "recent": [], "suppressed": 0}
        ts, score, this_alert = event["ts"], risk_score["score"], alert_id(event["event_id"])
        recent = [r for r in state["recent"] if r[2] > ts - policy.cooldown_ms and r[0] != event["event_id"]]
        if score >= EVIDENCE_SHARE * threshold:
            recent = (recent + [[event["event_id"], score, ts]])[-MAX_EVIDENCE:]
        state["recent"] = recent
        alert = None
        if score >= threshold:
            cooling = state["until"] is not None and ts < state["until"] and state["id"] != this_alert
            if cooling:
                state["suppressed"] += 1
            else:
                alert = build_alert(risk_score, threshold, now_ms)
                alert["evidence_event_ids"] = [r[0] for r in recent if r[0] != event["event_id"]] + [event["event_id"]]
                alert["severity"] = max(
                    [severity(score, threshold)] + [r.severity for r in rules.rules if r.name in risk_score["matched_rules"]],
                    key=["low", "medium", "high", "critical"].index)
                alert["suppressed_before"] = state["suppressed"]
                state.update(until=ts + policy.cooldown_ms, id=this_alert, suppressed=0)
        user["a"] = state
        records["user"] = user
        return alert

    # -- learning ---------------------------------------------------------
    def learn(self, example: dict[str, Any], offset: int) -> list[ReputationDelta]:
        """Teaches every model one label; returns how entity reputations change."""
        self.models.learn(example, offset)
        return self.reputation_deltas(example)

    @staticmethod
    def reputation_deltas(example: dict[str, Any]) -> list[ReputationDelta]:
        delta = label_deltas(example.get("previous_label"), example["label"])
        if not delta:
            return []
        return [ReputationDelta(name, key, example["label_ts"], delta)
                for name, key in example.get("entities", {}).items() if name in ENTITIES]


class LocalStore:
    """All entity state in one process, one shard per entity: what offline
    evaluation, replay checks and tests use around the same ``Detector``."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, str], bytes] = {}
        self.reputation: dict[tuple[str, str], bytes] = {}

    def score(self, detector: Detector, event: dict[str, Any], now_ms: int) -> Scored:
        keys = entity_keys(event)
        states = {k: EntityState(self.records.get((k, v)), reputation=self.reputation.get((k, v))) for k, v in keys.items()}
        scored = detector.score(event, states, now_ms)
        for name, raw in scored.updates.items():
            self.records[(name, keys[name])] = raw
        return scored

    def learn(self, detector: Detector, example: dict[str, Any], offset: int) -> None:
        for d in detector.learn(example, offset):
            self.reputation[(d.entity, d.key)] = add_label_stored(self.reputation.get((d.entity, d.key)),
                                                                  d.label_ts, d.delta)
