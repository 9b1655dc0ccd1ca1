"""Online risk model: a River logistic regression learning from late labels.

Counts are log-scaled and standardised (running statistics over *all* scored
traffic, not only labelled events), then fed to a logistic regression trained
one label at a time with class weights that undo label imbalance.

>>> m = OnlineRiskModel(min_labels_per_class=1)
>>> bad = {"user_login_failures_1h": 9.0, "ip_new_for_user": 1.0}
>>> good = {"user_login_failures_1h": 0.0, "ip_new_for_user": 0.0}
>>> for _ in range(50):
...     m.observe(bad); m.observe(good)
...     m.learn_one(bad, True); m.learn_one(good, False)
>>> m.predict_proba_one(bad) > 0.8 > 0.2 > m.predict_proba_one(good)
True
>>> m.explain_one(bad)[0]["code"] in bad
True
"""

from __future__ import annotations

import math
from typing import Mapping

from river import linear_model, optim, preprocessing, utils

from detectors.catalog import describe

MODEL_NAME = "online-logreg"
MODEL_GENERATION = 1
MAX_CLASS_WEIGHT = 20.0


def log_scaled(features: Mapping[str, float]) -> dict[str, float]:
    return {k: math.log1p(v) if v > 0 else v for k, v in features.items()}


def observe_and_standardise(scaler: preprocessing.StandardScaler, features: Mapping[str, float]) -> dict[str, float]:
    """``scaler.learn_one`` then ``scaler.transform_one`` on the log-scaled features, in
    one pass: the same arithmetic as River's (bit for bit), a third of the time."""
    log1p = math.log1p
    counts, means, variances = scaler.counts, scaler.means, scaler.vars
    out = {}
    for name, value in features.items():
        x = log1p(value) if value > 0 else value
        n = counts[name] + 1
        counts[name] = n
        old_mean = means[name]
        mean = means[name] = old_mean + (x - old_mean) / n
        old_variance = variances[name]
        variance = variances[name] = old_variance + ((x - old_mean) * (x - mean) - old_variance) / n
        out[name] = (x - mean) / variance**0.5 if variance else 0.0
    return out


class OnlineRiskModel:
    """``observe`` every scored event, ``learn_one`` every label, ``predict_proba_one`` to score."""

    def __init__(self, min_labels_per_class: int = 20, learning_rate: float = 0.01, name: str = MODEL_NAME,
                 l2: float = 0.0, scaler: preprocessing.StandardScaler | None = None):
        self.name = name
        self.min_labels_per_class = min_labels_per_class
        # Models over the same traffic may share one scaler (champion and challenger do).
        self.scaler = scaler if scaler is not None else preprocessing.StandardScaler()
        # Adam: per-feature step sizes suit ~90 features of very different
        # scales and sparsity (measured on the simulator: alert precision/recall
        # 0.75/0.74 after 0.8 simulated days, against 0.67/0.39 with plain SGD).
        self.learning_rate = learning_rate
        self.classifier = linear_model.LogisticRegression(optimizer=optim.Adam(learning_rate), l2=l2)
        self.positives = 0
        self.negatives = 0

    @property
    def updates(self) -> int:
        return self.positives + self.negatives

    @property
    def version(self) -> str:
        """Changes with every update, so a score names the exact model state behind it."""
        return f"{self.name}/{MODEL_GENERATION}+{self.updates}"

    @property
    def ready(self) -> bool:
        return min(self.positives, self.negatives) >= self.min_labels_per_class

    def observe(self, features: Mapping[str, float]) -> None:
        self.scaler.learn_one(log_scaled(features))

    def inputs(self, features: Mapping[str, float]) -> dict[str, float]:
        """What the classifier sees: log-scaled, standardised features."""
        return self.scaler.transform_one(log_scaled(features))

    def predict_proba_one(self, features: Mapping[str, float]) -> float:
        return self.predict_proba_inputs(self.inputs(features))

    def predict_proba_inputs(self, inputs: Mapping[str, float]) -> float:
        """``predict_proba_one`` on features already through ``inputs``."""
        return self.classifier.predict_proba_one(inputs).get(True, 0.0)

    def learn_one(self, features: Mapping[str, float], is_abuse: bool) -> None:
        if is_abuse:
            self.positives += 1
            weight = self.negatives / self.positives
        else:
            self.negatives += 1
            weight = self.positives / self.negatives
        weight = min(MAX_CLASS_WEIGHT, max(1.0, weight))
        self.classifier.learn_one(self.inputs(features), is_abuse, w=weight)

    def warm_start(self, weights: Mapping[str, float], intercept: float, positives: int, negatives: int) -> None:
        """Starts from weights fitted offline (on ``inputs``) as if it had learned that many labels."""
        # A fresh optimizer: Adam's moments from earlier online steps would keep pushing
        # the new weights along the old trajectory.
        self.classifier.optimizer = optim.Adam(self.learning_rate)
        self.classifier._weights = utils.VectorDict(dict(weights))
        self.classifier.intercept = float(intercept)
        self.positives, self.negatives = positives, negatives

    def explain_one(self, features: Mapping[str, float], top: int = 3,
                    inputs: Mapping[str, float] | None = None) -> list[dict]:
        """The features that pushed this score up most, in human words."""
        weights = self.classifier._weights
        contributions = [
            (weights.get(name, 0.0) * value, name)
            for name, value in (inputs if inputs is not None else self.inputs(features)).items()
        ]
        contributions.sort(reverse=True)
        reasons = []
        for contribution, name in contributions[:top]:
            if contribution <= 0:
                break
            value = features[name]
            reasons.append({
                "code": name,
                "text": f"{describe(name)}: {value:g}",
                "weight": round(contribution, 4),
                "value": value,
            })
        return reasons
