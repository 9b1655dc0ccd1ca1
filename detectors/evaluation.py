"""Prequential evaluation: the live detector code over a labelled stream, in event-time order.

Each event is scored with what the detector knew at that moment; its label is
revealed only ``label_delay_ms`` later (as moderation, appeals and chargebacks
would; ``None`` reveals each label at its own timestamp), and only then joins
the training feed, exactly like the live worker's label join. Memory is bounded by the entity state and the labels in flight,
not by the stream: scores are kept as five floats per labelled event.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from detectors.events import decode_event
from detectors.labels import on_label, on_score
from detectors.lifecycle import ModelSet
from detectors.pipeline import Detector, LocalStore, Scored
from schemas import ContractViolation

DAY = 86_400_000
BATCH_EVENTS = 1000
SCORED = ("fused", "model", "anomaly", "rules", "content")


@dataclass
class Evaluation:
    events: int = 0
    rejected: int = 0
    labelled: int = 0
    examples: int = 0
    alerts: int = 0
    labelled_alerts: int = 0  # precision can only be known where there is a label
    true_alerts: int = 0
    day_alerts: dict[int, list[int]] = field(default_factory=dict)  # day -> [labelled alerts, true alerts]
    days: list[int] = field(default_factory=list)
    truth: list[bool] = field(default_factory=list)
    scores: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in SCORED})

    def _metrics(self, mask: np.ndarray) -> dict[str, dict[str, float]]:
        y = np.asarray(self.truth)[mask]
        out = {}
        for name in SCORED:
            s = np.asarray(self.scores[name])[mask]
            if y.size and 0 < y.sum() < y.size:
                out[name] = {"roc_auc": round(float(roc_auc_score(y, s)), 4),
                             "pr_auc": round(float(average_precision_score(y, s)), 4)}
        return out

    def _alert_precision(self, day: int) -> float | None:
        alerted, true = self.day_alerts.get(day, (0, 0))
        return round(true / alerted, 4) if alerted else None

    def report(self, k: int = 100) -> dict[str, Any]:
        days = np.asarray(self.days)
        positives = int(np.sum(self.truth))
        per_day = []
        for day in sorted(set(self.days)):
            mask = days == day
            y = np.asarray(self.truth)[mask]
            fused = np.asarray(self.scores["fused"])[mask]
            top = np.argsort(-fused)[:k]
            per_day.append({"day": int(day), "events": int(mask.sum()), "abusive": int(y.sum()),
                            f"precision_at_{k}": round(float(y[top].mean()), 4) if top.size else 0.0,
                            "alert_precision": self._alert_precision(int(day)),
                            **{name: m for name, m in self._metrics(mask).items() if name in ("fused", "model")}})
        return {
            "events": self.events,
            "rejected": self.rejected,
            "labelled_events": self.labelled,
            "abusive_events": positives,
            "training_examples": self.examples,
            "overall": self._metrics(np.ones(len(self.truth), dtype=bool)),
            "alerts": {"count": self.alerts, "on_labelled_events": self.labelled_alerts,
                       "precision": round(self.true_alerts / self.labelled_alerts, 4) if self.labelled_alerts else 0.0,
                       "recall": round(self.true_alerts / positives, 4) if positives else 0.0},
            "per_day": per_day,
        }


def evaluate(
    events: Iterable[bytes],
    labels: dict[str, dict[str, Any]],
    label_delay_ms: int | None,
    detector: Detector | None = None,
    on_score_record: Callable[[dict[str, Any], bool | None, bool], None] | None = None,
    max_event_bytes: int = 65536,
) -> Evaluation:
    """``events`` are raw JSON lines in event-time order; ``labels`` maps event id to its label record."""
    detector = detector or Detector(ModelSet.new())
    store = LocalStore()
    result = Evaluation()
    reveal: list[tuple[int, int, str]] = []  # (reveal time, tie-break, event id)
    pending: dict[str, dict[str, Any]] = {}
    offset = 0
    sequence = 0

    def reveal_until(ts: int) -> None:
        nonlocal offset
        while reveal and reveal[0][0] <= ts:
            _, _, event_id = heapq.heappop(reveal)
            _, example = on_label(pending.pop(event_id), labels[event_id])
            if example is not None:
                store.learn(detector, example, offset)
                offset += 1
                result.examples += 1

    def record(event: dict[str, Any], scored: Scored) -> None:
        nonlocal sequence
        result.events += 1
        label = labels.get(event["event_id"])
        alerted = scored.alert is not None
        if label is not None:
            is_abuse = label["label"] == "abuse"
            result.labelled += 1
            result.truth.append(is_abuse)
            result.days.append(event["ts"] // DAY)
            result.scores["fused"].append(scored.risk_score["score"])
            for name in ("model", "anomaly", "rules", "content"):
                result.scores[name].append(scored.risk_score["detectors"][name])
            pending[event["event_id"]], _ = on_score(None, scored.risk_score)
            sequence += 1
            heapq.heappush(reveal, (reveal_time(event, label), sequence, event["event_id"]))
            if alerted:
                result.labelled_alerts += 1
                result.true_alerts += is_abuse
                day = result.day_alerts.setdefault(event["ts"] // DAY, [0, 0])
                day[0] += 1
                day[1] += is_abuse
        if alerted:
            result.alerts += 1
        if on_score_record is not None:
            on_score_record(scored.risk_score, None if label is None else label["label"] == "abuse", alerted)

    def reveal_time(event: dict[str, Any], label: dict[str, Any]) -> int:
        return max(event["ts"], label["ts"]) if label_delay_ms is None else event["ts"] + label_delay_ms

    # Events are scored in batches, like the live worker, each batch ending before the
    # next label is revealed: every event sees exactly the labels it would one at a time.
    batch: list[dict[str, Any]] = []
    batch_reveals = math.inf  # the earliest reveal among the batch's labelled events

    def score_batch() -> None:
        nonlocal batch_reveals
        for event, scored in zip(batch, store.score_many(detector, batch, now_ms=None)):
            record(event, scored)
        batch.clear()
        batch_reveals = math.inf

    for raw in events:
        try:
            event = decode_event(raw, max_event_bytes)
        except ContractViolation:
            result.rejected += 1
            continue
        if batch and (len(batch) >= BATCH_EVENTS
                      or min(batch_reveals, reveal[0][0] if reveal else math.inf) <= event["ts"]):
            score_batch()
        reveal_until(event["ts"])
        batch.append(event)
        label = labels.get(event["event_id"])
        if label is not None:
            batch_reveals = min(batch_reveals, reveal_time(event, label))
    score_batch()
    return result
