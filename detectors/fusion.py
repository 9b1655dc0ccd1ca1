"""One calibrated risk score from the detectors' scores.

A logistic regression over the detectors' outputs (supervised model, anomaly,
rules, content), trained online from labels: a stacker whose log-loss training
calibrates the result. It learns from the rules and anomaly scores an event got
at scoring time and from what the model and content classifier say about it
when its label arrives (``ModelSet.learn``).
The stacker is monotone: a detector's weight never goes below zero, so a
higher score from any detector never lowers the fused score. Without that, a
stretch of labels on which one detector happened to be wrong (say the model
missing a new campaign) can flip its weight negative and invert it for every
later event. Until it has seen enough labels of both classes, the fused score is
the most confident trusted detector (rules always; the model and content classifier
once they are ready), which needs no calibration to be conservative. The
anomaly score joins that maximum scaled to at most 0.5, below the default alert
thresholds (``UNTRUSTED_CAP``): with no labels yet it is the best ordering of events for
review there is, but an uncalibrated detector never raises an alert alone.

>>> f = FusionModel(min_labels_per_class=1)
>>> f.fuse({"model": 0.9, "anomaly": 0.1, "rules": 0.0, "content": 0.0}, model_ready=True, content_ready=False)
0.9
"""

from __future__ import annotations

from typing import Mapping

import cython
from cython.cimports.libc.math import log
from river import linear_model, optim, utils

from detectors.model import HoldsWeights, held_weights, logistic_proba

DETECTORS = ("model", "anomaly", "rules", "content")
UNTRUSTED_CAP = 0.5
LEARNING_RATE = 0.02


@cython.cfunc
@cython.locals(p=cython.double)
def _logit(p) -> cython.double:
    p = min(1 - 1e-6, max(1e-6, p))  # C comparisons when compiled, with max's and min's order
    return log(p / (1 - p))  # the C library's log, which math.log calls for a positive number


@cython.ccall  # a C call from fuse
def fusion_inputs(scores: Mapping[str, float], has_text: cython.bint) -> dict:
    return {
        "model": _logit(scores.get("model", 0.5)),
        "anomaly": scores.get("anomaly", 0.0),
        "rules": scores.get("rules", 0.0),
        "content": _logit(scores.get("content", 0.5)) if has_text else 0.0,
        "has_text": float(has_text),
    }


class FusionModel(HoldsWeights):
    version = "stack-logreg/1"

    def __init__(self, min_labels_per_class: int = 50):
        self.classifier = linear_model.LogisticRegression(optimizer=optim.Adam(LEARNING_RATE), l2=0.0)
        self.min_labels_per_class = min_labels_per_class
        self.positives = self.negatives = 0

    @property
    def ready(self) -> bool:
        return min(self.positives, self.negatives) >= self.min_labels_per_class

    def fuse(self, scores: Mapping[str, float], model_ready: bool, content_ready: bool, has_text: bool = False) -> float:
        if self.ready:
            inputs = fusion_inputs(scores, has_text)
            weights = held_weights(self, self.classifier) if cython.compiled else None
            if weights is None:
                return float(self.classifier.predict_proba_one(inputs).get(True, 0.0))
            return logistic_proba(weights, self.classifier.intercept, inputs)
        trusted = [scores.get("rules", 0.0), UNTRUSTED_CAP * scores.get("anomaly", 0.0)]
        if model_ready:
            trusted.append(scores.get("model", 0.0))
        if content_ready and has_text:
            trusted.append(scores.get("content", 0.0))
        return max(trusted)

    def learn_one(self, scores: Mapping[str, float], has_text: bool, is_abuse: bool) -> None:
        if is_abuse:
            self.positives += 1
        else:
            self.negatives += 1
        self.classifier.learn_one(fusion_inputs(scores, has_text), is_abuse)
        self._keep_monotone()

    def _keep_monotone(self) -> None:
        weights = self.classifier._weights
        for name in DETECTORS:
            if weights.get(name, 0.0) < 0.0:
                weights[name] = 0.0

    def warm_start(self, weights: Mapping[str, float], intercept: float, positives: int, negatives: int) -> None:
        """Starts from a stacker fitted offline (on ``fusion_inputs``), with a fresh optimizer
        (see ``OnlineRiskModel.warm_start``)."""
        self.classifier.optimizer = optim.Adam(LEARNING_RATE)
        self.classifier._weights = utils.VectorDict(dict(weights))
        self.classifier.intercept = float(intercept)
        self.positives, self.negatives = positives, negatives
        self._keep_monotone()

    def weights(self) -> dict[str, float]:
        return dict(self.classifier.weights)
