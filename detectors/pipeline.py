"""The detector: one valid event and its entities' state in, a fused risk score
(and maybe an alert) out; one training example in, every model a little wiser.

This is the code the live worker, offline evaluation and tests all run; it
knows nothing about Kafka or Faust. State crosses the boundary as bytes so the
worker stores exactly what the detector wrote; the live worker keeps a batch's
records decoded between its events instead (see ``EntityState``) and encodes
each once, when the batch ends.

>>> d = Detector(ModelSet.new(min_labels_per_class=1))
>>> out = d.score({"event_id": "e1", "type": "signup", "ts": 0, "user_id": "u1",
...                "schema_version": 1}, {}, now_ms=1)
>>> 0.0 <= out.risk_score["score"] <= 1.0, out.alert is None, list(out.updates)
(True, True, ['user'])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence

import cython
import orjson

from detectors.anomaly import AnomalyModel
from detectors.catalog import CONTENT_TYPES, ENTITIES
from detectors.decisions import alert_id, build_alert, score_id, severity
from detectors.features import EntityState, Extraction, encode_record, entity_keys, extract
from detectors.lifecycle import ModelSet
from detectors.model import log_feature_matrix
from detectors.reputation import add_label_stored, label_deltas
from detectors.rounding import rounded
from detectors.rules import RuleSet, load_rules

EVIDENCE_SHARE = 0.75  # events at 3/4 of the threshold are kept as evidence for the next alert
MAX_EVIDENCE = 10


Extracted = tuple[dict[str, Any], Mapping[str, EntityState], Extraction]  # event, its states, extract()'s result


class RulesSource(Protocol):
    rules: RuleSet


@dataclass
class StaticRules:
    rules: RuleSet


@cython.cclass
class Scored:
    """One event's risk score, its alert (if any) and the records its scoring wrote."""
    # An extension type when compiled, like ``Extraction``: one is made per event, and a frozen
    # dataclass's __init__ (a Python frame setting each field) cost ~5% of score_many (round 18).
    # entity name -> the record of the shard this event wrote, alert state included
    records = cython.declare(dict, visibility="readonly")
    keys = cython.declare(dict, visibility="readonly")  # entity name -> key
    risk_score = cython.declare(dict, visibility="readonly")
    alert = cython.declare(object, visibility="readonly")  # dict[str, Any] | None
    # their JSON, when ``score_many`` was asked for it (``with_json``); else None
    risk_score_json = cython.declare(object, visibility="readonly")  # bytes | None
    alert_json = cython.declare(object, visibility="readonly")  # bytes | None
    _updates = cython.declare(object)

    def __init__(self, records: dict[str, dict], keys: dict[str, str], risk_score: dict[str, Any],
                 alert: dict[str, Any] | None, risk_score_json: bytes | None = None,
                 alert_json: bytes | None = None) -> None:
        self.records, self.keys, self.risk_score, self.alert = records, keys, risk_score, alert
        self.risk_score_json, self.alert_json = risk_score_json, alert_json
        self._updates = None

    @property
    def updates(self) -> dict[str, bytes]:
        """The records as the store keeps them (read before a later event of the batch updates
        a record kept decoded; see ``EntityState``)."""
        if self._updates is None:
            self._updates = {name: encode_record(record) for name, record in self.records.items()}
        return self._updates


@dataclass(frozen=True)
class ReputationDelta:
    entity: str
    key: str
    label_ts: int
    delta: int


def _quiet(alert_state: dict[str, Any]) -> bool:
    """An account's alert state holds nothing: never alerted, no evidence kept, none suppressed."""
    return alert_state["until"] is None and alert_state["id"] is None and not alert_state["recent"] \
        and not alert_state["suppressed"]


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
        return self.score_many([(event, states, extract(event, states, source))], now_ms)[0]

    def score_many(self, batch: Sequence[Extracted], now_ms: int | None, with_json: bool = False) -> list[Scored]:
        """Scores a batch of events already through ``features.extract``, in order;
        ``now_ms`` None scores each as of its own event time (evaluation, replays).
        ``with_json`` gives each result its risk score's and alert's JSON as well, made as
        each is decided, while its objects are in the CPU's caches: a live worker that made it
        after the batch took twice as long per score (docs/performance.md, round 40). The risk
        score's text counts (``inputs.text``) are then their JSON (an ``orjson.Fragment``), made
        without their dict (round 41).

        Feature extraction is per event, as each event's entity state includes the
        events before it (the caller threads the records through); the models then
        take the batch as matrices. Every model learns the rows in order, so any
        split of a stream into batches scores it the same as one event at a time.
        """
        if not batch:
            return []
        models, rules = self.models, self.rules_source.rules
        champion = models.champion
        features = [extraction.features for _, _, extraction in batch]
        log_features = log_feature_matrix(features)
        model_scores, shadow_scores, model_inputs = models.observe_and_score_many(log_features)
        anomaly_scores = self.anomaly.score_then_learn_many(log_features)
        explanations = champion.explain_many(features, model_inputs) if champion.ready else None
        alert_states: dict[str, dict[str, Any]] = {}  # the batch's alert decisions so far, per user
        # nothing learns during a batch: the same versions and readiness for all its events
        model_version, model_ready, shadow_version = champion.version, champion.ready, models.challenger.version
        content_ready = models.content.ready
        scored = []
        for i, (event, states, extraction) in enumerate(batch):
            has_text = event["type"] in CONTENT_TYPES
            # the text's n-gram counts as a dict, or with ``with_json`` as their JSON
            content, counts = models.content.score_text(event["text"], with_json) if has_text else (0.0, None)
            matched = rules.matches(extraction.features, event["type"])
            scores = {
                "model": rounded(model_scores[i], 6),
                "anomaly": rounded(anomaly_scores[i], 6),
                "rules": max((r.score for r in matched), default=0.0),
                "content": rounded(content, 6) if has_text else 0.0,
            }
            fused = models.fusion.fuse(scores, model_ready, content_ready, has_text)
            risk_score = {
                "schema_version": 1,
                "score_id": score_id(event["event_id"]),
                "event_id": event["event_id"],
                "event_type": event["type"],
                "user_id": event["user_id"],
                "ts": event["ts"],
                "scored_at": event["ts"] if now_ms is None else now_ms,
                "score": rounded(min(1.0, max(0.0, fused)), 6),
                "model_version": model_version,
                "model_ready": model_ready,
                "rules_version": rules.version,
                "detectors": scores,
                "matched_rules": [r.name for r in matched],
                "shadow": {"model_version": shadow_version,
                           "score": rounded(shadow_scores[i], 6)},
                "reasons": self._reasons(extraction.features, scores, matched,
                                         explanations[i] if explanations is not None else []),
                "entities": extraction.keys,
                "features": extraction.features,  # those that are not 0: every reader takes an absent one as 0
            }
            if counts is not None:  # the label join learns from their shares
                risk_score["inputs"] = {"text": orjson.Fragment(counts) if with_json else counts}
            records = dict(extraction.records)
            alert = self._decide(event, risk_score, rules, states, records, risk_score["scored_at"], alert_states)
            if with_json:
                scored.append(Scored(records, extraction.keys, risk_score, alert, orjson.dumps(risk_score),
                                     None if alert is None else orjson.dumps(alert)))
            else:
                scored.append(Scored(records, extraction.keys, risk_score, alert))
        return scored

    def _reasons(self, features: dict[str, float], scores: dict[str, float], matched: list,
                 explanation: list[dict[str, Any]]) -> list[dict[str, Any]]:
        reasons: list[dict[str, Any]] = []
        for rule in matched:
            detail = "; ".join(c.describe(features) for c in rule.conditions)
            reasons.append({"code": f"rule:{rule.name}", "text": f"{rule.description} ({detail})",
                            "weight": rule.score, "value": None})
        if self.models.content.ready and scores["content"] >= 0.7:
            reasons.append({"code": "content", "text": f"text resembles confirmed abuse (content score {scores['content']:.2f})",
                            "weight": scores["content"], "value": scores["content"]})
        reasons.extend(explanation)
        if scores["anomaly"] >= 0.7:
            reasons.append({"code": "anomaly", "text": f"activity unlike normal traffic (anomaly score {scores['anomaly']:.2f})",
                            "weight": scores["anomaly"], "value": scores["anomaly"]})
        return reasons[:5]

    def _decide(
        self, event: dict[str, Any], risk_score: dict[str, Any], rules: RuleSet,
        states: Mapping[str, EntityState], records: dict[str, dict], now_ms: int,
        alert_states: dict[str, dict[str, Any]],
    ) -> dict[str, Any] | None:
        """The alert policy: per-type thresholds, one alert per account per cooldown,
        evidence from the account's recent high scores. Its state lives in the user record
        while it holds anything (a quiet one, no alert and no evidence, is left out: most
        accounts never score near a threshold); ``alert_states`` holds it for users decided
        earlier in the batch, whose records the batch's later events were extracted from
        before those decisions."""
        policy = rules.policy
        threshold = policy.threshold_for(event["type"])
        user = records.get("user")
        if user is None:  # a redelivered event: the record already applied it
            stored = states.get("user")
            user = stored.own_record() if stored is not None else None
            if user is None:
                return None
        state = alert_states.get(event["user_id"]) or user.get("a")
        ts, score = event["ts"], risk_score["score"]
        if score < EVIDENCE_SHARE * threshold and (state is None or _quiet(state)):
            # Most events: quiet before, and nothing this score leaves to remember or alert on
            if "a" in user:  # a quiet state stored before round 40: left out from now on
                del user["a"]
                records["user"] = user
            return None
        if state is None:
            state = {"until": None, "id": None, "recent": [], "suppressed": 0}
        recent = [r for r in state["recent"] if r[2] > ts - policy.cooldown_ms and r[0] != event["event_id"]]
        if score >= EVIDENCE_SHARE * threshold:
            recent = (recent + [[event["event_id"], score, ts]])[-MAX_EVIDENCE:]
        state["recent"] = recent
        alert = None
        if score >= threshold:
            this_alert = alert_id(event["event_id"])
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
        alert_states[event["user_id"]] = state
        if _quiet(state):
            user.pop("a", None)
        else:
            user["a"] = dict(state)  # as of this event: the batch's later decisions update ``state``
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
        return self.score_many(detector, [event], now_ms)[0]

    def score_many(self, detector: Detector, events: Sequence[dict[str, Any]], now_ms: int | None) -> list[Scored]:
        """Like the live worker: features per event over the records the batch wrote so far, models per batch."""
        batch: list[Extracted] = []
        for event in events:
            keys = entity_keys(event)
            states = {k: EntityState(self.records.get((k, v)), reputation=self.reputation.get((k, v)))
                      for k, v in keys.items()}
            extraction = extract(event, states)
            for name, raw in extraction.updates.items():
                self.records[(name, keys[name])] = raw
            batch.append((event, states, extraction))
        scored = detector.score_many(batch, now_ms)
        for result in scored:
            for name, raw in result.updates.items():
                self.records[(name, result.keys[name])] = raw
        return scored

    def learn(self, detector: Detector, example: dict[str, Any], offset: int) -> None:
        for d in detector.learn(example, offset):
            self.reputation[(d.entity, d.key)] = add_label_stored(self.reputation.get((d.entity, d.key)),
                                                                  d.label_ts, d.delta)
