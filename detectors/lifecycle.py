"""Everything a worker learns, as one versioned object: champion and shadow
(challenger) risk models, the content model and the fusion stacker, with
prequential metrics for champion and challenger and the offset of the last
training example applied.

Every worker applies the same training examples in the same order (they are
broadcast on one partition), so every worker's ``ModelSet`` is the same, and a
checkpoint plus the examples after its offset restores it exactly.

Promotion swaps champion and challenger; rollback swaps them back. Both keep
learning all along, so neither loses what it learned while in the shadow.

>>> models = ModelSet.new(min_labels_per_class=1)
>>> example = {"label": "abuse", "previous_label": None, "features": {"user_events_1m": 9.0},
...            "detectors": {"model": 0.5, "anomaly": 0.0, "rules": 0.0, "content": 0.5}, "text": None}
>>> models.learn(example, offset=0)
>>> models.examples, models.offset
(1, 0)
>>> ModelSet.from_bytes(models.to_bytes()).champion.version == models.champion.version
True
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import river
from river import metrics

from detectors.content import ContentModel
from detectors.fusion import FusionModel
from detectors.model import OnlineRiskModel

CHECKPOINT_FORMAT = 2


class CheckpointError(ValueError):
    pass


@dataclass
class ModelMetrics:
    """Prequential: each example is scored before the model learns from it."""
    roc_auc: Any = field(default_factory=metrics.ROCAUC)
    log_loss: Any = field(default_factory=metrics.LogLoss)
    examples: int = 0

    def update(self, is_abuse: bool, probability: float) -> None:
        self.roc_auc.update(is_abuse, {True: probability, False: 1 - probability})
        self.log_loss.update(is_abuse, {True: probability, False: 1 - probability})
        self.examples += 1

    def report(self) -> dict[str, float]:
        return {"roc_auc": round(float(self.roc_auc.get()), 4), "log_loss": round(float(self.log_loss.get()), 4),
                "examples": self.examples}


@dataclass
class ModelSet:
    champion: OnlineRiskModel
    challenger: OnlineRiskModel
    content: ContentModel
    fusion: FusionModel
    champion_metrics: ModelMetrics = field(default_factory=ModelMetrics)
    challenger_metrics: ModelMetrics = field(default_factory=ModelMetrics)
    examples: int = 0
    offset: int = -1  # of the last training example applied
    promotions: list[str] = field(default_factory=list)
    bootstrap: dict[str, Any] | None = None  # the report of the offline fit this set started from

    @classmethod
    def new(cls, min_labels_per_class: int = 20) -> "ModelSet":
        champion = OnlineRiskModel(min_labels_per_class, learning_rate=0.01, name="online-logreg")
        return cls(
            champion=champion,
            # The shadow differs in one knob at a time; promote it when it wins.
            challenger=OnlineRiskModel(min_labels_per_class, learning_rate=0.003, name="online-logreg-slow",
                                       scaler=champion.scaler),
            content=ContentModel(min_labels_per_class),
            fusion=FusionModel(),
        )

    def learn(self, example: dict[str, Any], offset: int) -> None:
        is_abuse = example["label"] == "abuse"
        features = example["features"]
        has_text = bool(example.get("text"))
        # The stacker learns from what the models say *now*, before they learn this label
        # (out of sample): their scores at scoring time may be days old, from a model that
        # was not even trained yet, and would teach the stacker to ignore a model that has
        # since become good. Rules and anomaly keep their scoring-time scores.
        # Champion and challenger share their scaler (``new``), which learns only from scored
        # traffic: the example is scaled once for both to predict and learn.
        champion_row = self.champion.scaled(features)
        challenger_row = (champion_row if self.challenger.scaler is self.champion.scaler
                          else self.challenger.scaled(features))
        now = dict(example["detectors"], model=self.champion.predict_proba_scaled(champion_row))
        if has_text:
            now["content"] = self.content.predict_proba_one(example["text"])
        self.champion_metrics.update(is_abuse, now["model"])
        self.challenger_metrics.update(is_abuse, self.challenger.predict_proba_scaled(challenger_row))
        self.fusion.learn_one(now, has_text, is_abuse)
        self.champion.learn_scaled(champion_row, is_abuse)
        self.challenger.learn_scaled(challenger_row, is_abuse)
        if has_text:
            self.content.learn_one(example["text"], is_abuse)
        self.examples += 1
        self.offset = offset

    def observe_and_score_many(self, log_features: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Scored events, one row each (``log_feature_matrix``): every scaler learns each row once,
        in order, then champion and challenger score them. Returns both probabilities and
        the champion's inputs (for its reasons)."""
        scalers = {id(m.scaler): m.scaler for m in (self.champion, self.challenger)}
        inputs = {key: scaler.learn_transform_many(log_features) for key, scaler in scalers.items()}
        champion_inputs = inputs[id(self.champion.scaler)]
        return (self.champion.predict_proba_many(champion_inputs),
                self.challenger.predict_proba_many(inputs[id(self.challenger.scaler)]), champion_inputs)

    def promote(self) -> str:
        """The challenger becomes champion (and the champion its shadow)."""
        self.champion, self.challenger = self.challenger, self.champion
        self.champion_metrics, self.challenger_metrics = self.challenger_metrics, self.champion_metrics
        self.promotions.append(self.champion.name)
        return self.champion.name

    def report(self) -> dict[str, Any]:
        return {
            "champion": {"version": self.champion.version, **self.champion_metrics.report()},
            "challenger": {"version": self.challenger.version, **self.challenger_metrics.report()},
            "content": {"version": self.content.version, "ready": self.content.ready},
            "fusion": {"version": self.fusion.version, "ready": self.fusion.ready,
                       "weights": {k: float(v) for k, v in self.fusion.weights().items()}},
            "examples": self.examples,
            "offset": self.offset,
            "promotions": self.promotions,
            "bootstrap": self.bootstrap,
        }

    def to_bytes(self) -> bytes:
        return pickle.dumps({"format": CHECKPOINT_FORMAT, "river": river.__version__, "models": self})

    @staticmethod
    def from_bytes(raw: bytes) -> "ModelSet":
        try:
            payload = pickle.loads(raw)  # checkpoints come from our own topic or file, never from users
        except Exception as exc:
            raise CheckpointError(f"unreadable model checkpoint: {exc}") from None
        if payload.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"checkpoint format {payload.get('format')} is not {CHECKPOINT_FORMAT}")
        if payload.get("river") != river.__version__:
            raise CheckpointError(
                f"checkpoint was written with river {payload.get('river')}, this worker has {river.__version__}; "
                "River models are not portable across versions: install the pinned version or retrain")
        return payload["models"]
