"""From a score to a decision: severity and the alert record.

Ids are derived from the input event, so processing the same event twice
(at-least-once delivery) yields the same alert id and consumers can dedupe.

>>> alert_id("e-1") == alert_id("e-1") != alert_id("e-2")
True
>>> severity(0.97, threshold=0.8), severity(0.85, threshold=0.8)
('critical', 'medium')
"""

from __future__ import annotations

import hashlib
from typing import Any


def _derived_id(kind: str, event_id: str) -> str:
    return f"{kind}-" + hashlib.blake2b(event_id.encode(), digest_size=12).hexdigest()


def alert_id(event_id: str) -> str:
    return _derived_id("alert", event_id)


def score_id(event_id: str) -> str:
    return _derived_id("score", event_id)


def severity(score: float, threshold: float) -> str:
    # Severity bands split the range above the threshold in thirds.
    span = max(1e-9, 1.0 - threshold)
    position = (score - threshold) / span
    if position >= 2 / 3:
        return "critical"
    if position >= 1 / 3:
        return "high"
    return "medium"


def build_alert(score: dict[str, Any], threshold: float, now_ms: int) -> dict[str, Any]:
    return {
        "schema_version": 1,
        "alert_id": alert_id(score["event_id"]),
        "event_id": score["event_id"],
        "event_type": score["event_type"],
        "entity": f"user:{score['user_id']}",
        "user_id": score["user_id"],
        "ts": score["ts"],
        "created_at": now_ms,
        "score": score["score"],
        "threshold": threshold,
        "severity": severity(score["score"], threshold),
        "reasons": score["reasons"],
        "model_version": score["model_version"],
        "evidence_event_ids": [score["event_id"]],
        "detectors": score.get("detectors", {}),
        "matched_rules": score.get("matched_rules", []),
        "rules_version": score.get("rules_version", ""),
    }
